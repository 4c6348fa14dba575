"""SSKD recipes: one file per teacher-student pair of the SSKD README table (CIFAR-100)."""
