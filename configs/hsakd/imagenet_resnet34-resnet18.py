"""HSAKD on ImageNet, ResNet-34 -> ResNet-18 (torchvision layout, 224 px).

Paper (IJCAI'21 Table 2), top-1 / top-5 %: Teacher 73.31 / 91.42, Teacher* 75.48 / 92.67,
student alone 69.75 / 89.07; HSAKD (Ours) 72.16 / 90.85; HSAKD* (Ours*) 72.39 / 91.00.
The paper reports the student's final-head accuracy on unrotated validation images
(`eval/top1`, `eval/top5`).
Reference schedule (`train_student_imagenet.py`): SGD momentum 0.9 without Nesterov, wd 1e-4,
batch 256, 100 epochs, lr 0.1 ×0.1 at 30/60/90 — for the student, for the classifiers on the
frozen teacher and for the joint "Teacher*" alike. The frozen teacher is torchvision's
pretrained ResNet-34, converted once into a jaxkd teacher file:

    python -m jaxkd.import_teacher --arch resnet34_imagenet --num_classes 1000 --out teachers/resnet34_imagenet.msgpack resnet34-333f7ec4.pth
    python -m jaxkd.main --config configs/hsakd/imagenet_resnet34-resnet18.py --workdir runs/hsakd/imagenet_resnet34-resnet18 --config.teacher.checkpoint=teachers/resnet34_imagenet.msgpack
    python -m jaxkd.main --config configs/hsakd/imagenet_resnet34-resnet18.py:star --workdir runs/hsakd_star/imagenet_resnet34-resnet18

The dataset is tfds `imagenet2012` (train / validation), prepared beforehand: it cannot be
downloaded at run time.
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = common.base_config(teacher="resnet34_imagenet", student="resnet18_imagenet")
  config.dataset.name = "imagenet2012"
  config.dataset.eval_split = "validation"
  config.teacher.num_epochs = 90     # torchvision's ResNet-34 recipe, if trained here
  config.teacher.lr = 0.1
  config.method.teacher_lr = 0.1
  config.method.joint_teacher_epochs = 100
  config.method.joint_teacher_lr = 0.1
  config.method.joint_teacher_milestones = (30, 60, 90)
  config.method.teacher_checkpoint = "best"   # the reference's ImageNet student scripts load _best
  config.optimizer.lr = 0.1
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4
  config.schedule.milestones = (30, 60, 90)
  config.num_epochs = 100
  config.batch_size = 256
  config.eval_batch_size = 256
  return common.apply_arg(config, arg)
