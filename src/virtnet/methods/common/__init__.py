"""What several methods share: distillation and the teacher copy, loading from a checkpoint, the
sequential baselines' base, unit orders, the virtual network and the methods on units. Not a method."""
