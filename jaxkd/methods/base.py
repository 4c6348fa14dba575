"""What a distillation method is, as far as the trainer is concerned.

A method is data, not a branch in the trainer: the views it needs from the input pipeline,
whether it reads a teacher, heads it adds to the student and to the teacher, and pure losses

    loss(student_out, teacher_out, labels, hparams) -> (scalar, metrics)

`student_out` / `teacher_out` are dicts with at least 'logits' [R, N] and 'feats' (the named taps
of the backbone) over the R rows of the step (R = B·views, interleaved image-major: row V·i + k is
image i, view k), plus whatever the heads add. `labels` holds the B class labels of the images.
Every metric a loss returns is a scalar mean over the step and is logged as `train/<name>`.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import ml_collections

Outputs = Mapping[str, Any]
LossFn = Callable[[Outputs, Optional[Outputs], jax.Array, ml_collections.ConfigDict],
                  tuple[jax.Array, dict[str, jax.Array]]]
# heads(num_classes, hparams, backbone) -> nn.Module; the backbone module is given because some
# heads copy its family's blocks (HSAKD's auxiliary classifiers).
HeadsFactory = Callable[[int, ml_collections.ConfigDict, Any], Any]
# eval_metrics(out, labels, hparams, mask) -> {name: [B] per-image scores in [0, 1]}; `mask` [B]
# is 0 on the padding rows of the last eval batch (in-batch terms must ignore them); the trainer
# averages the scores of the real rows over the eval split and logs them as `eval/<name>`.
EvalMetricsFn = Callable[[Outputs, jax.Array, ml_collections.ConfigDict, jax.Array],
                         dict[str, jax.Array]]
# bridge(num_train_examples, hparams) -> nn.Module or None; see Method.bridge.
BridgeFactory = Callable[[int, ml_collections.ConfigDict], Any]
# teacher_constants(teacher_model_name, teacher_variables, hparams) -> pytree of arrays; see
# Method.teacher_constants.
TeacherConstantsFn = Callable[[str, Any, ml_collections.ConfigDict], Any]
# make(config, hparams, schedule, frozen) -> optax transformation; see TermOptimizer.
OptimizerFactory = Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict, Any,
                             Optional[Any]], Any]


@dataclasses.dataclass(frozen=True)
class TeacherPreparation:
  """How a method prepares its teacher before distillation (stage `teacher_<method>`).

  Attributes:
    heads: factory `(num_classes, hparams, backbone) -> nn.Module` of the teacher's heads, called as
      `heads(outputs, train=...)` and returning a dict merged into the teacher outputs.
    loss: the loss that trains them, `loss(teacher_out, None, labels, hparams)`.
    views: input views of that stage.
    frozen_backbone: True: the trained teacher backbone is loaded, kept in inference mode and
      not updated; only the heads learn (SSKD's SS module, HSAKD's "Teacher"). False: backbone
      and heads are trained jointly from scratch and replace the plain teacher stage (HSAKD's
      "Teacher*").
    num_epochs, lr, milestones: hparams field names holding this stage's schedule (multistep,
      decay 0.1), so that recipes and command lines can change them; an lr of −1 means
      `optimizer.lr`; milestones None: a constant learning rate.
    select: optional `(eval scores, hparams) -> score or None`; when it gives a score, the
      teacher handed to the student is the one of the evaluation with the highest score (e.g.
      HSAKD keeps the best auxiliary joint-label accuracy), else the last one.
  """
  heads: HeadsFactory
  loss: LossFn
  views: str = "none"
  frozen_backbone: bool = True
  num_epochs: str = "teacher_epochs"
  lr: str = "teacher_lr"
  milestones: Optional[str] = "teacher_milestones"
  select: Optional[Callable[[Mapping[str, float], ml_collections.ConfigDict], Optional[float]]] = None

  def training_method(self, method: "Method") -> "Method":
    """What stage `teacher_<method>` trains: this loss on these views and heads, judged by the
    method's own evaluation metrics."""
    return Method(name=method.name, loss=self.loss, views=self.views, uses_teacher=False,
                  student_heads=self.heads, eval_metrics=method.eval_metrics)


@dataclasses.dataclass(frozen=True)
class TapNeed:
  """The feature taps a method reads, checked on both networks before any work.

  `select(tap shapes, hparams)` picks the taps read (shapes for one image, in the order of the
  network's feats); each must have `rank` dimensions (4: a spatial map [N, H, W, C]; 2: a
  vector [N, C]) and there must be at least `at_least` of them. With `paired` the method pairs
  the student's with the teacher's one to one, so both must give as many.
  """
  what: str
  select: Callable[[list, ml_collections.ConfigDict], list]
  rank: int = 4
  at_least: int = 1
  paired: bool = False

  def missing(self, shapes: Sequence[tuple[int, ...]], hparams: ml_collections.ConfigDict
              ) -> Optional[str]:
    """None when the network gives these taps, else what it lacks."""
    chosen = self.select(list(shapes), hparams)
    if len(chosen) < self.at_least or any(len(shape) != self.rank for shape in chosen):
      kind = "spatial maps [N, H, W, C]" if self.rank == 4 else "a vector [N, C]"
      return f"{self.what} as {kind}"
    return None


@dataclasses.dataclass(frozen=True)
class StudentPreparation:
  """How a method prepares its student before distillation (stage `student_<method>_init`,
  RepDistiller's `init` stage of AB and FSP).

  The student's feature layers — every parameter its taps depend on; the classifier keeps its
  initial values — and the method's `bridge` (e.g. AB's connector) are trained on `loss`
  against the frozen teacher, at a constant learning rate; the student stage then starts from
  the prepared student (the bridge is dropped).

  Attributes:
    loss: `loss(student_out, teacher_out, labels, hparams)`.
    bridge: optional factory `(num_train_examples, hparams) -> nn.Module` of modules trained in
      this stage only, called as Method.bridge is.
    num_epochs, lr: hparams field names holding this stage's epochs and learning rate (an lr
      of −1 means `optimizer.lr`, the student's).
  """
  loss: LossFn
  bridge: Optional[BridgeFactory] = None
  num_epochs: str = "init_epochs"
  lr: str = "init_lr"

  def training_method(self, method: "Method") -> "Method":
    """What stage `student_<method>_init` trains: the method with this loss and bridge, on the
    config's optimiser, without the method's negatives or evaluation metrics."""
    return dataclasses.replace(method, loss=self.loss, bridge=self.bridge, eval_metrics=None,
                               negatives=None, optimizer=None)


@dataclasses.dataclass(frozen=True)
class OnlineTeacherHead:
  """A teacher head trained during the student stage, beside the student, by its own loss and
  optimiser (EGA's teacher head on a frozen CLIP or self-supervised teacher).

  Per step, from one inference-mode forward of the frozen teacher backbone and the head's
  current parameters θ_t: the student's loss reads the head's outputs as constants, and the
  head takes one step of `optimizer(hparams)` on `loss(teacher_out, None, labels, hparams)`
  with respect to θ_t alone. Both updates start from the same (pre-update) θ_t.

  Attributes:
    heads: factory `(num_classes, hparams, backbone) -> nn.Module`, called as
      `heads(teacher_out, train=...)`; its outputs are merged into the teacher outputs.
    loss: the head's loss, `loss(teacher_out, None, labels, hparams) -> (scalar, metrics)`.
    optimizer: `(hparams) -> optax.GradientTransformation`, the head's own optimiser.
  """
  heads: HeadsFactory
  loss: LossFn
  optimizer: Callable[[ml_collections.ConfigDict], Any]


@dataclasses.dataclass(frozen=True)
class TermOptimizer:
  """An optimiser a method supplies in place of the config's SGD, stepping the gradients of
  named loss terms separately (mdistiller's DOT: the task and the distillation gradients, each
  with its own momentum).

  The training step runs the student forward once, then takes the gradient of each term in
  `terms` (metrics the loss returns, e.g. `loss_task`, `loss_distill`: the weighted summands of
  its objective) in one backward pass each, and calls

    tx.update({term: grads}, opt_state, params, reached={term: pytree of bool})

  `reached[term]` is True on the parameters the term's gradient reaches at all — PyTorch's
  `p.grad is not None` after that term's backward, static for the stage: a parameter the term
  does not depend on, or depends on only through `stop_gradient`, is False (its gradient is
  zeros). The optimiser's state is the train state's `opt_state`: checkpointed and resumed
  with it.

  Attributes:
    terms: names of the loss's metrics whose gradients the optimiser takes, in this order.
    make: `(config, hparams, schedule, frozen) -> optax.GradientTransformationExtraArgs`: the
      run's config (its `optimizer` fields), the method's hyper-parameters, the stage's
      learning-rate schedule (of the optimiser's step count) and `frozen`, a pytree prefix of
      the params with True on subtrees that must never change (or None), as
      jaxkd.optim.make_optimizer takes it.
    check: optional `(config, hparams) -> None` raising a UserError on a config the optimiser
      cannot run (e.g. a momentum it cannot split), called by the plan before any work.
  """
  terms: tuple[str, ...]
  make: OptimizerFactory
  check: Optional[Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], None]] = None


@dataclasses.dataclass(frozen=True)
class SwitchDefaults:
  """Defaults that replace some of a method's own while hyper-parameter `field` equals `value`
  (e.g. logit standardization's temperature and weights while `logit_standardize` is True).

  `defaults` is a mapping {field: value}, or a function of the method's defaults so far (its
  own, those of the teacher/student pair, and those of the switches listed before this one)
  returning one, for defaults derived from them (DKD's α, β ×9). Fields that a config sets
  are never replaced: a switch only moves defaults.
  """
  field: str
  value: Any
  defaults: Union[Mapping[str, Any],
                  Callable[[ml_collections.ConfigDict], Mapping[str, Any]]]

  def resolve(self, base: ml_collections.ConfigDict) -> Mapping[str, Any]:
    """The switch's defaults given the method's defaults so far."""
    return self.defaults(base) if callable(self.defaults) else self.defaults


# module(student_backbone, teacher_out, num_classes, hparams) -> nn.Module; see Deployment.
DeployedModuleFn = Callable[[Any, Any, int, ml_collections.ConfigDict], Any]
# variables(trained_variables, teacher_constants, hparams) -> the deployed module's variables.
DeployedVariablesFn = Callable[[Any, Any, ml_collections.ConfigDict], Any]


@dataclasses.dataclass(frozen=True)
class Deployment:
  """The network a method deploys when it is not the trained student network (SimKD: the
  student's backbone, the projector trained beside it and the teacher's classifier).

  The student stage evaluates this network (its top-1 is the stage's), exports its variables
  as the student file, and `python -m jaxkd.evaluate --method <name> --teacher <model>` rebuilds
  it to read that file.

  Attributes:
    module: `(student_backbone, teacher_out, num_classes, hparams) -> nn.Module`, called as
      `module.apply(variables, x, train=False)` and returning {'logits': [N, num_classes], ...};
      `teacher_out` holds the shapes (`jax.ShapeDtypeStruct`) of the frozen teacher's outputs
      for one image, as a bridge's initialisation sees them.
    variables: `(trained, teacher_constants, hparams) -> variables` of that module, from the
      student stage's variables (the Network's: {'params': {'backbone', 'bridge', ...},
      'batch_stats': ...}) and the method's teacher constants (Method.teacher_constants).
  """
  module: DeployedModuleFn
  variables: DeployedVariablesFn


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered distillation method.

  Attributes:
    name: registry name, used in configs (`--config.method.name=kd`).
    loss: the pure student loss (see module docstring).
    views: input views of the student's training batch: 'none', 'rotations' or 'two_crops'.
    uses_teacher: whether `teacher_out` is computed (False for plain cross-entropy).
    defaults: default hyper-parameters; the fields of `config.method` override them.
    student_heads: optional factory `(num_classes, hparams, backbone) -> nn.Module` of extra
      student heads,
      called as `heads(outputs, train=...)` and returning a dict merged into the outputs.
    teacher: optional preparation of the teacher (heads trained before distillation).
    eval_metrics: optional extra evaluation of the student on the eval split, computed on the
      method's views (see EvalMetricsFn); top-1/top-5 on the original images are always there.
    online_teacher_head: optional head on the frozen teacher, trained in the student stage by
      its own loss and optimiser (see OnlineTeacherHead); the teacher then needs no classifier,
      so a CLIP tower or a self-supervised backbone can teach.
    bridge: optional factory `(num_train_examples, hparams) -> nn.Module or None` of a module
      trained with the student that reads both sides: called in training steps as
      `bridge(student_out, teacher_out, batch, train=True)` after the student's heads, its
      outputs merged into the student outputs; its 'batch_stats' collection is state that the
      step updates (CRD's embeddings and memory banks: the RepDistiller criteria with
      parameters). Not called in evaluation.
    negatives: optional `(hparams) -> K`; K > 0 makes every training batch also hold 'index'
      [B] (the example's position in the training set) and 'contrast_index' [B, K + 1] (it,
      then K training examples of other classes; CRD's 'exact' sampling).
    check_hparams: optional `(hparams) -> None` raising a UserError on a bad value, called
      before any work is done.
    check_pair: optional `(teacher_model, student_model, num_classes) -> None` raising a
      UserError when the method cannot pair these zoo models, called before any work is done.
    taps: optional TapNeed, the taps the method reads, checked on both networks before any
      work (a registered network may give fewer than the zoo's).
    check_mesh: optional `(mesh) -> None` raising a UserError when the method cannot run on
      the run's devices, called before any work is done.
    pair_defaults: optional `(teacher_model, student_model) -> {field: value}`: defaults that
      depend on the pair (DKD's β per pair in its reference configs); `config.method` still
      overrides them.
    student_preparation: optional training of the student before distillation (see
      StudentPreparation).
    preact: the taps of both networks are taken before the last ReLU of each stage, in every
      stage of the method (RepDistiller's `preact=True`, used by AB).
    switch_defaults: defaults that depend on another hyper-parameter's value (see
      SwitchDefaults), applied in order after `defaults` and `pair_defaults`, before the
      config's fields. A switch's field may be absent from `defaults` (the switch is then off
      unless a config sets it), so that turning a switch on adds a field without changing
      the hyper-parameters of runs that leave it off.
    teacher_preact: whether the teacher's stage taps are taken before their last ReLU; None:
      as `preact`. The plan resolves it per stage and the loop builds the teacher so;
      ReviewKD reads the student's stage maps after their ReLU and the teacher's before it.
    teacher_train_mode: the frozen teacher runs its BatchNorms on the statistics of the step's
      batch (training mode) in the student's training steps; its running statistics are not
      kept and it still passes no gradient (`steps.train_step(teacher_train_mode=...)`;
      mdistiller's OFD leaves its teacher in train mode).
    teacher_constants: optional `(teacher_model_name, teacher_variables, hparams) -> pytree` of
      constants that depend only on the frozen teacher, computed once per stage on the host
      from its variables as the trainer holds them (the Network's: `{'params': {'backbone':
      ...}, 'batch_stats': ...}`); the training step hands them to the bridge and the loss as
      `teacher_out['constants']` (`steps.train_step(teacher_constants=...)`; OFD's margins,
      read from the teacher's BatchNorms).
    class_maps: both networks' outputs also hold 'class_maps' [R, h, w, N], the class
      activation maps: each network's classifier kernel applied, without its bias, at every
      position of the map whose spatial mean is its 'pooled' (the zoo's `class_maps=True`, see
      jaxkd.models.register). The student's carry the gradient into its classifier's kernel and
      its backbone (CAT-KD). The plan refuses networks that do not give them.
    deployed: optional Deployment, the network the method deploys in place of the trained
      student: the student stage evaluates and exports it (SimKD).
    optimizer: optional TermOptimizer that replaces the config's SGD in the student stage
      (not in its preparation stages), stepping the gradients of named loss terms separately
      (mdistiller's DOT); None: `jaxkd.optim.make_optimizer` on the gradient of the loss.
    student_views_apart: the student's training forward runs once per view of the batch's
      [B, V, H, W, C] images, view 0 first, instead of once over the B·V rows: its BatchNorms
      normalise each view by the statistics of that view's B images, and their running
      statistics are updated view after view; the outputs are interleaved back into rows
      V·i + k (`steps.train_step(student_views_apart=...)`; MLKD's reference calls its student
      on the weak, then on the strong images). Not with a `bridge` (it reads every row).
    optional_hparams: hyper-parameters the method reads with a default of its own where a
      config leaves them out (`hparams.get(name, default)`), kept out of `defaults` so that the
      effective config of runs that do not set them stays as it was. With `defaults` and the
      switches' fields they are the fields the method reads: a config field outside them is
      reported as ignored before the run.
  """
  name: str
  loss: LossFn
  views: str = "none"
  uses_teacher: bool = True
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  student_heads: Optional[HeadsFactory] = None
  teacher: Optional[TeacherPreparation] = None
  eval_metrics: Optional[EvalMetricsFn] = None
  online_teacher_head: Optional[OnlineTeacherHead] = None
  bridge: Optional[BridgeFactory] = None
  negatives: Optional[Callable[[ml_collections.ConfigDict], int]] = None
  check_hparams: Optional[Callable[[ml_collections.ConfigDict], None]] = None
  check_pair: Optional[Callable[[str, str, int], None]] = None
  taps: Optional[TapNeed] = None
  check_mesh: Optional[Callable[[Any], None]] = None
  pair_defaults: Optional[Callable[[str, str], Mapping[str, Any]]] = None
  student_preparation: Optional[StudentPreparation] = None
  preact: bool = False
  switch_defaults: Sequence[SwitchDefaults] = ()
  teacher_preact: Optional[bool] = None
  teacher_train_mode: bool = False
  teacher_constants: Optional[TeacherConstantsFn] = None
  optimizer: Optional[TermOptimizer] = None
  student_views_apart: bool = False
  class_maps: bool = False
  deployed: Optional[Deployment] = None
  optional_hparams: Sequence[str] = ()

  @property
  def teacher_taps_preact(self) -> bool:
    """Whether the teacher's stage taps are read before their last ReLU (`teacher_preact`,
    else as the student's, `preact`)."""
    return self.preact if self.teacher_preact is None else self.teacher_preact

  def __post_init__(self):
    if self.student_views_apart and self.bridge is not None:
      raise ValueError(f"method {self.name!r}: a bridge reads every row of the step, so the "
                       f"student's views cannot run apart (student_views_apart)")

  def hparams(self, overrides: Optional[ml_collections.ConfigDict] = None,
              pair: Optional[tuple[str, str]] = None) -> ml_collections.ConfigDict:
    """The method's defaults, then its defaults for the (teacher, student) `pair`, then those
    of each switch whose field has its value (the config's value of that field when it sets
    one, else the default), updated with the fields of `overrides` (except `name`, and fields
    left None: a config's placeholders for "the method's default")."""
    merged = ml_collections.ConfigDict(dict(self.defaults))
    if pair is not None and self.pair_defaults is not None:
      merged.update(dict(self.pair_defaults(*pair)))
    given = {} if overrides is None else {
        key: value for key, value in overrides.items() if key != "name" and value is not None}
    for switch in self.switch_defaults:
      if given.get(switch.field, merged.get(switch.field)) == switch.value:
        merged.update(dict(switch.resolve(ml_collections.ConfigDict(merged.to_dict()))))
    for key, value in given.items():
      merged[key] = value
    return merged

  def switched_fields(self) -> frozenset[str]:
    """The fields whose default some switch may replace (a config leaves them None so that
    the switch can decide them)."""
    base = ml_collections.ConfigDict(dict(self.defaults))
    return frozenset(key for switch in self.switch_defaults for key in switch.resolve(base))

  def switches(self) -> dict[str, type]:
    """{field: type} of the switches' own fields (a config's placeholders for them)."""
    return {switch.field: type(switch.value) for switch in self.switch_defaults}
