"""HSAKD* ("Ours*"): HSAKD with the "Teacher*", trained jointly with its classifiers from scratch.

The student side is `jaxkd.methods.hsakd`'s; only the teacher preparation differs (backbone not
frozen, schedule `joint_teacher_*`: 240 epochs, ×0.1 at 150/180/210).
"""

from jaxkd.methods import hsakd

METHOD = hsakd.make_method("hsakd_star", joint_teacher=True)
