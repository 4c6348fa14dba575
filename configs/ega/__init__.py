"""EGA recipes: one file per CLIP teacher of the reference (CIFAR-100), the student as argument."""
