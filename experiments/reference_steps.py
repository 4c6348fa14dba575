"""Times the reference PyTorch code's own training step of one method on one teacher/student pair.

Run by `experiments/speed_vs_reference.py` under a PyTorch interpreter (`--torch-python`); it
imports nothing of jaxkd, and jaxkd never imports it. The reference code bases are read from
`--code` (default experiments/reference_code/, see experiments/fetch_reference.sh), each at
the commit its folder's COMMIT file names.

What runs per batch is the reference's own code, fed a batch of random tensors already on the
device (the data loader is not part of the step, as on jaxkd's side):

  SSKD (xuguodong03/SSKD student.py): the student loop of the script, its `for x, target in
      train_loader:` statement, parsed from the file and executed as it is.
  HSAKD (winycg/HSAKD train_student_cifar.py): the script's `train(epoch, criterion_list,
      optimizer)` function, parsed from the file with `DistillKL`, `correct_num`, `adjust_lr`.
  RepDistiller baselines (HobbitLong/RepDistiller): `helper.loops.train_distill`, imported;
      the modules and criteria are built by the statements of `train_student.py`'s `main()`
      from `data = torch.randn(...)` to the `.cuda()` block, executed as they are, under the
      method's flags of scripts/run_cifar_distill.sh. Their `init(...)` preparation stage
      (AB, FT) is not run: it is a stage of its own, not the distillation step.
  DKD (megvii-research/mdistiller): `BaseTrainer.train_iter` of mdistiller/engine/trainer.py,
      imported, on the `DKD` distiller of the pair's yaml (configs/cifar100/dkd/), wrapped in
      `DataParallel` as tools/train.py does, with the trainer's own optimizer
      (`BaseTrainer.init_optimizer`).
  EGA (yccm/EGA): `helper.loops.train_distill`, imported; modules built by the statements of
      `train_student.py`'s `main()` that make the student, both heads, the criteria and both
      optimizers. Its teacher is what the script's `clip.load(opt.clip_mode)` returns: OpenAI
      CLIP's `model.CLIP` (openai/CLIP clip/model.py) of that tower, here with random weights
      (nothing is downloaded), converted to float16 on CUDA and float32 on CPU as `clip.load`
      does.

Where a script is a script (SSKD, HSAKD) or builds its modules inside `main()`, the harness
(the "thin driver" below) builds the networks with the reference's own model functions and
makes the objects the script's top level would make (parsed options with the script's own
argparse definitions, optimizers with its settings); the timed code is the reference's.
Teachers have random weights: the step's cost does not depend on them.

Timing: the loop reads its batches from `TimedBatches`, which notes the wall and CPU clock each
time the loop asks for the next batch (after a CUDA synchronize on a GPU), so a step is the
time from one request to the next: the loop's whole per-batch body, meters and `.item()` calls
included, as the reference runs it. The first `--warmup` steps are left out. With
`--dtype=bfloat16` the loop runs under `torch.autocast(bfloat16)`.

Output: one JSON object (`--out`, else stdout): step_s_all, step_cpu_s_all, images/s, peak host
and device memory, the torch version and threads, the reference's file and commit. Exit status
2 with one `error: ...` line when the reference code or torch is missing.
"""

import argparse
import ast
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CODE = os.path.join(HERE, "reference_code")
NUM_CLASSES = 100
IMAGE = (3, 32, 32)

# RepDistiller's --distill name and -r/-a/-b of scripts/run_cifar_distill.sh per method.
REPDISTILLER = {
    "kd": ("kd", 0.1, 0.9, 0), "fitnet": ("hint", 1, 0, 100), "at": ("attention", 1, 0, 1000),
    "sp": ("similarity", 1, 0, 3000), "cc": ("correlation", 1, 0, 0.02), "vid": ("vid", 1, 0, 1),
    "rkd": ("rkd", 1, 0, 1), "pkt": ("pkt", 1, 0, 30000), "ab": ("abound", 1, 0, 1),
    "ft": ("factor", 1, 0, 200), "fsp": ("fsp", 1, 0, 50), "nst": ("nst", 1, 0, 50),
    "kdsvd": ("kdsvd", 1, 0, 0), "crd": ("crd", 1, 0, 0.8), "crd_kd": ("crd", 1, 1, 0.8),
}
# Which code base holds each method's reference step.
REPOSITORY = dict({name: "RepDistiller" for name in REPDISTILLER},
                  sskd="SSKD", hsakd="HSAKD", dkd="mdistiller", ega="EGA")
METHODS = tuple(REPOSITORY)
# mdistiller's yaml per pair (configs/cifar100/dkd/).
DKD_YAML = {("resnet32x4", "resnet8x4"): "res32x4_res8x4.yaml",
            ("wrn_40_2", "wrn_16_2"): "wrn40_2_wrn_16_2.yaml"}
# The `clip_mode` of EGA's train_student.py for jaxkd's CLIP tower names, and OpenAI's
# architecture of each (as clip.model.build_model reads it off the released weights).
EGA_CLIP = {"clip_vit_b32": ("ViT-B/32", dict(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
    vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
    transformer_heads=8, transformer_layers=12))}


class MissingReference(Exception):
  """The reference code or PyTorch is not there; the message says what to do."""


# ----------------------------------------------------------------------------- the timed loop


class TimedBatches:
  """The loader a reference loop reads: the same batch `count` times; the wall and CPU clocks
  are noted at each request (and once more when the loop asks past the end)."""

  def __init__(self, batch, count, sync):
    self.batch, self.count, self.sync = batch, count, sync
    self.wall, self.cpu = [], []

  def __len__(self):
    return self.count

  def _mark(self):
    self.sync()
    self.wall.append(time.perf_counter())
    self.cpu.append(time.process_time())

  def __iter__(self):
    for _ in range(self.count):
      self._mark()
      yield self.batch
    self._mark()

  def steps(self, skip):
    """(wall seconds, CPU seconds) of each step after the first `skip`."""
    wall = [b - a for a, b in zip(self.wall, self.wall[1:])][skip:]
    cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:])][skip:]
    return wall, cpu


# --------------------------------------------------------------------- reading the reference


class Script:
  """A reference file parsed once; pieces of it are executed in a namespace, under its own
  file name (tracebacks point into the reference)."""

  def __init__(self, path):
    if not os.path.isfile(path):
      raise MissingReference(f"{path} is missing; run experiments/fetch_reference.sh")
    with open(path, encoding="utf-8") as f:
      self.path, self.tree = path, ast.parse(f.read(), path)

  def run(self, nodes, namespace):
    exec(compile(ast.Module(body=list(nodes), type_ignores=[]), self.path, "exec"), namespace)  # pylint: disable=exec-used
    return namespace

  def imports(self, namespace):
    """The file's top-level imports, each alone; the ones this environment lacks (loggers,
    torchvision's datasets) are left out."""
    for node in self.tree.body:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        try:
          self.run([node], namespace)
        except ImportError:
          pass
    return namespace

  def definition(self, name):
    """The top-level function or class `name`."""
    for node in self.tree.body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
        return node
    raise MissingReference(f"{self.path} has no top-level {name!r}")

  def parser(self, body):
    """The argparse parser built by the statements of `body` (`parser = ...` and
    `parser.add_argument(...)`)."""
    nodes = [n for n in body if _mentions(n, "parser") and "parse_args" not in _source(n)]
    return self.run(nodes, {"argparse": argparse})["parser"]


def _mentions(node, name):
  return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _source(node):
  return ast.unparse(node)


def _between(body, first, last):
  """The statements of `body` from the first whose source starts with `first` to the first
  after it whose source starts with `last`, both included."""
  texts = [_source(n) for n in body]
  try:
    i = next(k for k, t in enumerate(texts) if t.startswith(first))
    j = next(k for k in range(i, len(texts)) if texts[k].startswith(last))
  except StopIteration:
    raise MissingReference(f"the reference no longer has the statements {first!r} .. "
                           f"{last!r}; is it at the pinned commit?") from None
  return body[i:j + 1]


def _with_path(root):
  """Puts a code base first on sys.path (each run reads one: they all have a `models`)."""
  if not os.path.isdir(root):
    raise MissingReference(f"{root} is missing; run experiments/fetch_reference.sh")
  sys.path.insert(0, root)


def _commit(root):
  try:
    with open(os.path.join(root, "COMMIT"), encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return None


def _stub_missing(modules):
  """Stand-ins for the logging and config packages the measured code imports but does not
  use in its step (tqdm, tensorboardX, tensorboard_logger, yacs), where this environment lacks
  them: {module: {attribute: value}}."""
  for name, attributes in modules.items():
    if importlib.util.find_spec(name.split(".")[0]) is not None:
      continue
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
      module = sys.modules.setdefault(".".join(parts[:k]), types.ModuleType(".".join(parts[:k])))
      module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    for attribute, value in attributes.items():
      setattr(sys.modules[name], attribute, value)


class _Unused:
  """A logger class of a stand-in module: accepts anything, does nothing."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


def _package(name, root):
  """Registers package `name` at folder `root` without running its __init__ (mdistiller's
  imports every distiller, some of them SciPy)."""
  module = types.ModuleType(name)
  module.__path__ = [root]
  sys.modules[name] = module


# ----------------------------------------------------------------------------------- drivers
# Each returns (run, batch, file): run(loader) runs the reference loop over the loader's
# batches; batch is what the reference's data loader would yield, as tensors on the device.


def _images(torch, device, batch, *views):
  return torch.randn((batch,) + views + IMAGE, device=device)


def _labels(torch, device, batch, high=NUM_CLASSES):
  return torch.randint(0, high, (batch,), device=device)


def sskd(code, teacher, student, batch, device, torch):
  """SSKD's student loop, `for x, target in train_loader:` of student.py, as it is."""
  root = os.path.join(code, "SSKD")
  _with_path(root)
  script = Script(os.path.join(root, "student.py"))
  from models import model_dict  # pylint: disable=g-import-not-at-top,import-error
  from wrapper import wrapper  # pylint: disable=g-import-not-at-top,import-error
  args = script.parser(script.tree.body).parse_args(
      ["--s-arch", student, "--t-path", f"sskd_teacher_{teacher}_seed0"])
  t_model = wrapper(module=model_dict[teacher](num_classes=NUM_CLASSES)).to(device)
  t_model.eval()
  s_model = wrapper(module=model_dict[student](num_classes=NUM_CLASSES)).to(device)
  optimizer = torch.optim.SGD(s_model.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
  # The student's epoch loop: its statements before the batch loop (train mode, meters), then
  # the batch loop itself.
  epoch_loop = next(n for n in script.tree.body if isinstance(n, ast.For)
                    and "s_model" in _source(n) and _source(n.iter) == "range(args.epoch)")
  k = next(i for i, n in enumerate(epoch_loop.body) if isinstance(n, ast.For))
  namespace = script.imports({})
  namespace.update(args=args, s_model=s_model, t_model=t_model, optimizer=optimizer, epoch=0)

  def run(loader):
    namespace["train_loader"] = loader
    script.run(epoch_loop.body[:k + 1], namespace)

  data = (_images(torch, device, batch, 4), _labels(torch, device, batch))
  return run, data, script.path


def hsakd(code, teacher, student, batch, device, torch):
  """HSAKD's `train(epoch, criterion_list, optimizer)` of train_student_cifar.py, as it is."""
  root = os.path.join(code, "HSAKD")
  _with_path(root)
  script = Script(os.path.join(root, "train_student_cifar.py"))
  import models  # pylint: disable=g-import-not-at-top,import-error
  args = script.parser(script.tree.body).parse_args(
      ["--arch", f"{student}_aux", "--tarch", f"{teacher}_aux"])
  namespace = script.imports({})
  for name in ("DistillKL", "correct_num", "adjust_lr", "train"):
    script.run([script.definition(name)], namespace)
  net = torch.nn.DataParallel(getattr(models, args.arch)(num_classes=NUM_CLASSES).to(device))
  tnet = getattr(models, args.tarch)(num_classes=NUM_CLASSES).to(device)
  tnet.eval()
  tnet = torch.nn.DataParallel(tnet)
  _, ss_logits = net(torch.randn((2,) + IMAGE, device=device))
  nn = torch.nn
  optimizer = torch.optim.SGD(nn.ModuleList([net]).parameters(), lr=0.1, momentum=0.9,
                              weight_decay=args.weight_decay, nesterov=True)
  criterion_list = nn.ModuleList([nn.CrossEntropyLoss(), namespace["DistillKL"](args.kd_T)])
  log = tempfile.NamedTemporaryFile(prefix="hsakd_log_", suffix=".txt", delete=False)
  log.close()
  namespace.update(args=args, net=net, tnet=tnet, num_classes=NUM_CLASSES,
                   num_auxiliary_branches=len(ss_logits), log_txt=log.name)

  def run(loader):  # train() appends its epoch summary to log_txt at the end: dropped.
    namespace["trainloader"] = loader
    try:
      namespace["train"](0, criterion_list, optimizer)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(log.name)

  data = (_images(torch, device, batch), _labels(torch, device, batch))
  return run, data, script.path


def _repdistiller_options(script, distill, teacher, student, r, a, b):
  """train_student.py's options: its parser, with the method's flags."""
  parse_option = script.definition("parse_option")
  opt = script.parser(parse_option.body).parse_args(
      ["--model_s", student, "--path_t", f"save/models/{teacher}_vanilla/ckpt_epoch_240.pth",
       "--distill", distill, "-r", str(r), "-a", str(a), "-b", str(b)])
  opt.model_t = teacher  # parse_option's get_teacher_name(path_t)
  return opt


def _train_student_script(root):
  """The `train_student.py` of a RepDistiller-style repository (RepDistiller, EGA) at `root`,
  importable: its folder on the path, its logger stubbed."""
  _with_path(root)
  _stub_missing({"tensorboard_logger": {"Logger": _Unused}})
  return Script(os.path.join(root, "train_student.py"))


def _train_student_main(script, start, values, device):
  """(namespace, train_distill): `main()`'s statements from the one that begins with `start` to
  its `.cuda()` block, executed over the script's imports and `values` (the objects the
  statements before `start` would have made), and the modules and criteria they build moved to
  `device`; `helper.loops.train_distill` of the same repository."""
  from helper.loops import train_distill  # pylint: disable=g-import-not-at-top,import-error
  namespace = script.imports({})
  namespace.update(values)
  script.run(_between(script.definition("main").body, start, "if torch.cuda.is_available()"),
             namespace)
  namespace["module_list"].to(device)
  namespace["criterion_list"].to(device)
  return namespace, train_distill


def repdistiller(code, method, teacher, student, batch, device, torch):
  """RepDistiller's `helper.loops.train_distill` over modules built by `main()`'s own
  statements."""
  script = _train_student_script(os.path.join(code, "RepDistiller"))
  distill, r, a, b = REPDISTILLER[method]
  opt = _repdistiller_options(script, distill, teacher, student, r, a, b)
  from models import model_dict  # pylint: disable=g-import-not-at-top,import-error
  n_data = 50_000  # CIFAR-100's training images: CRD's memory bank
  namespace, train_distill = _train_student_main(script, "data = torch.randn", dict(
      opt=opt, n_data=n_data, n_cls=NUM_CLASSES, logger=None, train_loader=None,
      model_t=model_dict[teacher](num_classes=NUM_CLASSES),
      model_s=model_dict[student](num_classes=NUM_CLASSES),
      init=lambda *args, **kwargs: None), device)  # init: the preparation stage, not this step

  def run(loader):
    train_distill(1, loader, namespace["module_list"], namespace["criterion_list"],
                  namespace["optimizer"], opt)

  data = [_images(torch, device, batch), _labels(torch, device, batch),
          torch.randint(0, n_data, (batch,), device=device)]
  if distill == "crd":
    data.append(torch.randint(0, n_data, (batch, opt.nce_k + 1), device=device))
  return run, tuple(data), script.path


def _yaml_overrides(path):
  """{(section, key): value} of one of mdistiller's two-level yaml configs."""
  out, section = {}, None
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      key, _, value = line.strip().partition(":")
      if not line.startswith(" "):
        section = key
      elif value.strip():
        out[(section, key)] = _literal(value.strip())
  return out


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def dkd(code, teacher, student, batch, device, torch):
  """mdistiller's `BaseTrainer.train_iter` on its DKD distiller."""
  root = os.path.join(code, "mdistiller")
  _with_path(root)
  _stub_missing({"tqdm": {"tqdm": _Unused}, "tensorboardX": {"SummaryWriter": _Unused},
                 "yacs.config": {"CfgNode": types.SimpleNamespace}})  # cfg.py: attributes only
  _package("mdistiller", os.path.join(root, "mdistiller"))
  _package("mdistiller.distillers", os.path.join(root, "mdistiller", "distillers"))
  _package("mdistiller.engine", os.path.join(root, "mdistiller", "engine"))
  from mdistiller.distillers.DKD import DKD  # pylint: disable=g-import-not-at-top,import-error
  from mdistiller.engine.cfg import CFG as cfg  # pylint: disable=g-import-not-at-top,import-error
  from mdistiller.engine.trainer import BaseTrainer  # pylint: disable=g-import-not-at-top,import-error
  from mdistiller.engine.utils import AverageMeter  # pylint: disable=g-import-not-at-top,import-error
  from mdistiller.models import cifar_model_dict  # pylint: disable=g-import-not-at-top,import-error
  yaml = DKD_YAML.get((teacher, student))  # other pairs: cfg.py's defaults
  overrides = _yaml_overrides(os.path.join(root, "configs", "cifar100", "dkd", yaml)) if yaml else {}
  for (section, key), value in overrides.items():
    if hasattr(cfg, section) and hasattr(getattr(cfg, section), key):
      setattr(getattr(cfg, section), key, value)
  distiller = DKD(cifar_model_dict[student][0](num_classes=NUM_CLASSES),
                  cifar_model_dict[teacher][0](num_classes=NUM_CLASSES), cfg)
  trainer = types.SimpleNamespace(distiller=torch.nn.DataParallel(distiller.to(device)))
  trainer.optimizer = BaseTrainer.init_optimizer(trainer, cfg)
  meters = {name: AverageMeter() for name in
            ("training_time", "data_time", "losses", "top1", "top5")}

  def run(loader):  # BaseTrainer.train_epoch's batch loop, without its progress bar
    trainer.distiller.train()
    for data in loader:
      BaseTrainer.train_iter(trainer, data, 1, meters)

  data = (_images(torch, device, batch), _labels(torch, device, batch),
          torch.randint(0, 50_000, (batch,), device=device))
  return run, data, os.path.join(root, "mdistiller", "engine", "trainer.py")


def _clip_stand_in(code, tower, torch):
  """What EGA's script calls as `clip.load(name, device)`: OpenAI's CLIP model of that tower
  (openai/CLIP clip/model.py), with random weights, float16 on CUDA (build_model's
  convert_weights) and float32 on CPU, as `clip.load(..., jit=False)` returns it."""
  path = os.path.join(code, "CLIP", "clip", "model.py")
  if not os.path.isfile(path):
    raise MissingReference(f"{path} is missing; run experiments/fetch_reference.sh")
  spec = importlib.util.spec_from_file_location("openai_clip_model", path)
  model_py = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(model_py)
  mode, arch = EGA_CLIP[tower]

  def load(name, device="cpu", jit=False):
    del jit
    assert name == mode, (name, mode)
    model = model_py.CLIP(**arch)
    model_py.convert_weights(model)
    model = model.eval().to(device)
    if str(device) == "cpu":
      model.float()
    return model, None
  return types.SimpleNamespace(load=load), mode


def ega(code, teacher, student, batch, device, torch):
  """EGA's `helper.loops.train_distill` over the modules `main()`'s own statements build."""
  script = _train_student_script(os.path.join(code, "EGA"))
  clip, mode = _clip_stand_in(code, teacher, torch)
  opt = script.parser(script.definition("parse_option").body).parse_args(
      ["--model_s", student, "--clip_mode", mode, "--distill", "ega",
       "-node", "0.8", "-edge", "0.24"])
  namespace, train_distill = _train_student_main(script, "if opt.model_s in", dict(
      opt=opt, clip=clip, n_data=50_000, train_loader=None, logger=None), device)

  def run(loader):
    train_distill(1, loader, namespace["module_list"], namespace["criterion_list"],
                  namespace["optimizer"], namespace["optimizer_t"], opt)

  size = EGA_CLIP[teacher][1]["image_resolution"]
  data = (torch.randn((batch, 3, size, size), device=device), _images(torch, device, batch),
          _labels(torch, device, batch), torch.randint(0, 50_000, (batch,), device=device))
  return run, data, script.path


# -------------------------------------------------------------------------------- measuring


def reference_step(method, code, teacher, student, batch, device, torch):
  """(run, batch, file) of `method`'s reference loop on the pair."""
  if method in REPDISTILLER:
    return repdistiller(code, method, teacher, student, batch, device, torch)
  driver = {"sskd": sskd, "hsakd": hsakd, "dkd": dkd, "ega": ega}[method]
  return driver(code, teacher, student, batch, device, torch)


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingReference(f"{sys.executable} has no torch; pass --torch-python=PATH, an "
                           "interpreter with PyTorch") from None
  return torch


def _cpu_only_cuda(torch):
  """On a machine without CUDA, the references' `.cuda()` calls leave tensors and modules
  where they are (on the CPU)."""
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.nn.Module.cuda = lambda self, *args, **kwargs: self


class ReferenceRun:
  """One method's reference loop on one pair, set up once, timed on request."""

  def __init__(self, args):
    self.args, self.torch = args, _import_torch()
    torch = self.torch
    if args.threads:
      torch.set_num_threads(args.threads)
    self.device = torch.device(args.device)
    if self.device.type == "cpu":
      _cpu_only_cuda(torch)
    else:
      torch.backends.cudnn.benchmark = True  # as every one of the reference scripts sets it
    torch.manual_seed(0)
    start = time.perf_counter()
    with self._quiet():
      self.loop, self.data, self.path = reference_step(
          args.method, args.code, args.teacher, args.student, args.batch, self.device, torch)
    self.setup_s = time.perf_counter() - start

  def _quiet(self):
    """The reference's prints (per-batch logs) go to stderr with --verbose, else nowhere."""
    return contextlib.redirect_stdout(sys.stderr if self.args.verbose
                                      else open(os.devnull, "w", encoding="utf-8"))  # pylint: disable=consider-using-with

  def run(self, steps, warmup):
    """The reference loop over `warmup + steps` batches; the timed steps after the warm-up."""
    torch = self.torch
    sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
    loader = TimedBatches(self.data, warmup + steps, sync)
    autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                if self.args.dtype == "bfloat16" else contextlib.nullcontext())
    with self._quiet(), autocast:
      self.loop(loader)
    wall, cpu = loader.steps(warmup)
    peak_device = (torch.cuda.max_memory_allocated(self.device) / (1 << 20)
                   if self.device.type == "cuda" else None)
    return {"step_s_all": wall, "step_cpu_s_all": cpu,
            "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_memory_mb": peak_device}

  def description(self):
    root = os.path.join(self.args.code, REPOSITORY[self.args.method])
    return {"reference": REPOSITORY[self.args.method],
            "reference_file": os.path.relpath(self.path, self.args.code),
            "reference_commit": _commit(root), "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(), "device": str(self.device),
            "setup_s": self.setup_s}


def measure(args):
  """The record of one measurement: the description, then the timed steps."""
  reference = ReferenceRun(args)
  record = dict(reference.description(), side="reference", method=args.method,
                teacher=args.teacher, student=args.student, batch_images=args.batch,
                dtype=args.dtype)
  record.update(reference.run(args.steps, args.warmup))
  wall = record["step_s_all"]
  record.update(step_s=statistics.median(wall) if wall else None,
                images_per_s=args.batch / statistics.median(wall) if wall else None)
  return record


def serve(args):
  """Worker of speed_vs_reference.py: set up, say so, then answer its 'run' commands."""
  sys.path.insert(1, HERE)
  import speed_vs_reference as harness  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    reference = ReferenceRun(args)
  except Exception as e:  # pylint: disable=broad-except
    harness.say("error", f"{type(e).__name__}: {e}")
    raise
  harness.say("ready", reference.description())
  harness.serve({"run": reference.run})


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", required=True, choices=METHODS)
  parser.add_argument("--teacher", required=True)
  parser.add_argument("--student", required=True)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--device", default="cpu", help="cpu or cuda")
  parser.add_argument("--code", default=DEFAULT_CODE, help="the fetched reference code")
  parser.add_argument("--out", default="", help="JSON file ('' = stdout)")
  parser.add_argument("--verbose", action="store_true", help="show the reference's prints")
  parser.add_argument("--serve", action="store_true",
                      help="set up, then time on each 'run' line of stdin (the harness)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.serve:
    serve(args)
    return 0
  try:
    record = measure(args)
  except MissingReference as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = json.dumps(record, indent=2)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
