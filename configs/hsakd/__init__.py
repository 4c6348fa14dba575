"""HSAKD recipes: one file per teacher-student pair of the paper's tables."""
