"""CLIP image-tower weights from disk into `jaxkd.models.clip`, without PyTorch.

Two layouts are read, and nothing is ever downloaded:
  Hugging Face  a folder with `config.json` + `model.safetensors`, as `openai/clip-vit-base-patch32`
                publishes it (a whole `CLIPModel` or a `CLIPVisionModelWithProjection`); the
                tensors are read with safetensors' numpy API, the text tower is skipped.
  OpenAI        the `.pt` files of the `clip` package (ViT-B-32.pt, RN50.pt, ...): TorchScript zip
                archives. Only the tensors of `data.pkl` are read, by a restricted unpickler that
                turns every TorchScript object into a dict of its attributes and refuses anything
                else a weights file does not need; the archive's code is never run. A `torch.save`
                state dict (`{'visual.conv1.weight': ...}`) is read too.

Both are first brought to OpenAI's tensor names (the `visual.` prefix removed), from which one
rule builds the Flax variables: `jaxkd.interop.torch_layout.torch_to_flax`, after the fused
attention projection `in_proj_weight` is split into q/k/v and the few bare parameters
(`class_embedding`, `positional_embedding`, `proj`) are set aside.
"""

import dataclasses
import io
import json
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import errors
from jaxkd import paths
from jaxkd.interop import torch_checkpoint
from jaxkd.interop.torch_layout import torch_to_flax
from jaxkd.models import clip

# Where each registered tower's weights are published.
SOURCES = {
    "clip_vit_b32": ("openai/clip-vit-base-patch32", "ViT-B-32.pt"),
    "clip_vit_b16": ("openai/clip-vit-base-patch16", "ViT-B-16.pt"),
    "clip_rn50": (None, "RN50.pt"),
    "clip_rn101": (None, "RN101.pt"),
}

# Bare parameters of OpenAI's state dict (not a module's weight/bias): copied as they are.
_BARE = ("class_embedding", "positional_embedding", "proj", "attnpool.positional_embedding")


def missing_weights_error(name: str, checkpoint: str = "") -> errors.UserError:
  """The one error for CLIP weights that are not on disk, saying where to put them."""
  hf_repo, openai_file = SOURCES.get(name, (None, None))
  where = []
  if hf_repo:
    folder = hf_repo.split("/")[1]
    where.append(f"the Hugging Face folder {hf_repo} (config.json + model.safetensors) as "
                 f"--config.teacher.checkpoint=/path/to/{folder}/")
  if openai_file:
    where.append(f"OpenAI's {openai_file} (the `clip` package's release) as "
                 f"--config.teacher.checkpoint=/path/to/{openai_file}")
  if not where:
    where.append("a Hugging Face CLIP folder (config.json + model.safetensors) or an OpenAI "
                 "CLIP .pt file as --config.teacher.checkpoint=/path/to/it")
  found = f"nothing at {checkpoint!r}" if checkpoint else "no checkpoint was given"
  return errors.UserError(
      f"CLIP teacher {name!r} needs its pre-trained weights on disk ({found}); nothing is "
      f"downloaded at run time. Copy {' or '.join(where)}.")


# ---------------------------------------------------------------------------- Hugging Face


_HF_RENAMES = (  # HF vision tower name (after `vision_model.`) -> OpenAI `visual.` name
    (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^pre_layrnorm\.", "ln_pre."),
    (r"^post_layernorm\.", "ln_post."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"transformer.resblocks.\1.attn."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
)


def openai_names_from_hf(hf_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF `vision_model.*` + `visual_projection.weight` -> OpenAI's `visual.*` names (no prefix).

  q/k/v projections stay split (`attn.q_proj.weight`), which the Flax tower uses directly; the
  projection (out, in) becomes OpenAI's `proj` (in, out). Other entries (text tower, buffers
  such as `position_ids`) are left out; an unknown vision entry is an error.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in hf_state.items():
    if key == "visual_projection.weight":
      out["proj"] = np.ascontiguousarray(value.T)
      continue
    if not key.startswith("vision_model.") or key.endswith("position_ids"):
      continue
    name = key[len("vision_model."):]
    for pattern, replacement in _HF_RENAMES:
      renamed, count = re.subn(pattern, replacement, name)
      if count:
        out[renamed] = value
        break
    else:
      raise errors.UserError(f"unexpected entry {key!r} in a Hugging Face CLIP vision tower")
  return out


_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512,
                    layer_norm_eps=1e-5, hidden_act="quick_gelu")


def config_from_hf(hf_config: Mapping[str, Any]) -> clip.VisionTransformerConfig:
  """The tower config of a HF `config.json` (model_type 'clip' or 'clip_vision_model').

  Missing fields take the defaults of HF's CLIPVisionConfig (which are ViT-B/32's).
  """
  vision = dict(hf_config)
  if hf_config.get("model_type") == "clip" or "vision_config" in hf_config:
    vision = dict(hf_config.get("vision_config") or {})
    vision.setdefault("projection_dim", hf_config.get("projection_dim", 512))
  v = {key: vision.get(key, default) for key, default in _HF_DEFAULTS.items()}
  if v["hidden_act"] not in ("quick_gelu", "gelu"):
    raise errors.UserError(f"CLIP vision tower with hidden_act {v['hidden_act']!r}: only "
                           "quick_gelu and gelu are supported")
  return clip.VisionTransformerConfig(
      image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
      width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]),
      heads=int(v["num_attention_heads"]), output_dim=int(v["projection_dim"]),
      mlp_dim=int(v["intermediate_size"]), layer_norm_eps=float(v["layer_norm_eps"]),
      activation=v["hidden_act"])


def check_weights_path(checkpoint: str) -> None:
  """A CLIP checkpoint that exists is a folder or a regular file: a FIFO or a device is
  refused by its kind before anything opens it (reading one would block or never end)."""
  if not os.path.isdir(checkpoint):
    paths.check_regular_file(checkpoint, "teacher.checkpoint", "a Hugging Face CLIP folder or "
                             "OpenAI's .pt file")


def read_hf_folder(folder: str) -> tuple[clip.VisionTransformerConfig, dict[str, np.ndarray]]:
  """(config, OpenAI-named float32 state dict) of the vision tower in a HF folder."""
  config_path = os.path.join(folder, "config.json")
  weights_path = os.path.join(folder, "model.safetensors")
  for path in (config_path, weights_path):
    paths.check_regular_file(path, "CLIP file", "config.json + model.safetensors of the tower")
    if not os.path.isfile(path):
      hint = (" (only model.safetensors is read; convert pytorch_model.bin with transformers' "
              "save_pretrained(safe_serialization=True))"
              if os.path.exists(os.path.join(folder, "pytorch_model.bin")) else "")
      raise errors.UserError(f"CLIP folder {folder!r} has no {os.path.basename(path)}{hint}; "
                             "it needs config.json + model.safetensors")
  with open(config_path) as f:
    try:
      config = config_from_hf(json.load(f))
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{config_path!r} is not valid JSON ({e})") from None
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  hf_state = {}
  try:
    with safe_open(weights_path, framework="np") as f:
      for key in f.keys():
        if key.startswith("vision_model.") or key == "visual_projection.weight":
          hf_state[key] = np.asarray(f.get_tensor(key), np.float32)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot read {weights_path!r} with safetensors' numpy API "
                           f"({type(e).__name__}: {e})") from None
  if not hf_state:
    raise errors.UserError(f"{weights_path!r} holds no CLIP vision tower (no vision_model.* "
                           "tensors)")
  return config, openai_names_from_hf(hf_state)


# ---------------------------------------------------------------------------- OpenAI .pt


class _ScriptObject(dict):
  """A TorchScript object (an nn.Module in the archive) as the dict of its attributes."""

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, dict):
      self.update(state)


# pylint: disable-next=protected-access
class _TorchScriptUnpickler(torch_checkpoint._RestrictedUnpickler):
  """torch_checkpoint's restricted unpickler, plus the names a TorchScript `data.pkl` uses.

  `__torch__.*` classes become `_ScriptObject` (a plain dict: nothing of the class is run),
  `torch.jit._pickle.build_*list` become `list`, `torch.device` becomes `str`.
  """

  def find_class(self, module: str, name: str) -> Any:
    if module == "__torch__" or module.startswith("__torch__."):
      return _ScriptObject
    if module == "torch.jit._pickle" and name in (
        "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"):
      return list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return lambda value, type_str: value
    if (module, name) == ("torch", "device"):
      return str
    return super().find_class(module, name)


def _flatten_tensors(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  if isinstance(tree, np.ndarray):
    out[prefix[:-1]] = tree
  elif isinstance(tree, dict):
    for key, value in tree.items():
      if isinstance(key, str):
        out.update(_flatten_tensors(value, f"{prefix}{key}."))
  return out


def read_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive's module tree, as a flat state dict.

  Keys are attribute paths (`visual.conv1.weight`), as `torch.jit.load(path).state_dict()` has
  them. Only `data.pkl` and its storages are read; `code/` and `constants.pkl` are not.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      names = set(archive.namelist())
      pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
      pickles = [n for n in pickles if n.count("/") == min(p.count("/") for p in pickles)]
      if len(pickles) != 1:
        raise errors.UserError(f"{path!r} is a zip file but not a TorchScript archive")
      root = pickles[0][:-len("data.pkl")]
      storages: dict[str, Any] = {}

      def storage_for(storage_type, key, location, numel):
        del location  # Everything lands on the host.
        key = str(key)
        if key not in storages:
          member = next((m for m in (f"{root}data/{key}", f"{root}{key}") if m in names), None)
          if member is None or not isinstance(numel, int):
            raise errors.UserError(f"malformed TorchScript archive {path!r}: storage {key!r} "
                                   "is missing")
          raw = archive.read(member)
          if len(raw) < numel * storage_type.dtype.itemsize:
            raise errors.UserError(f"malformed TorchScript archive {path!r}: storage {key!r} "
                                   "is truncated")
          # pylint: disable-next=protected-access
          storage = torch_checkpoint._Storage(storage_type.dtype, numel)
          storage.data = np.frombuffer(raw, storage_type.dtype, count=numel)
          storages[key] = storage
        return storages[key]

      unpickler = _TorchScriptUnpickler(io.BytesIO(archive.read(pickles[0])), path, storage_for)
      tree = torch_checkpoint._materialize(unpickler.load())  # pylint: disable=protected-access
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"{path!r} is not a readable TorchScript archive "
                           f"({type(e).__name__}: {e})") from None
  return _flatten_tensors(tree)


def _is_torchscript(path: str) -> bool:
  """A zip holding `constants.pkl` beside `data.pkl` is what torch.jit.save writes."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("constants.pkl") for n in archive.namelist())


def read_openai_file(path: str) -> dict[str, np.ndarray]:
  """The float32 `visual.*` tensors of an OpenAI CLIP `.pt` (TorchScript or torch.save)."""
  if _is_torchscript(path):
    state = read_torchscript_state_dict(path)
  else:
    state = torch_checkpoint.find_state_dict(torch_checkpoint.load(path), path=path)
  visual = {k[len("visual."):]: np.asarray(v, np.float32)
            for k, v in state.items() if k.startswith("visual.")}
  if not visual:
    raise errors.UserError(f"{path!r} holds no CLIP image tower (no visual.* tensors)")
  return visual


def config_from_openai(state: Mapping[str, np.ndarray],
                       heads: Optional[int] = None) -> clip.CLIPConfig:
  """The tower config implied by OpenAI `visual.*` tensor shapes (as the `clip` package infers
  it); `heads` defaults to OpenAI's rule, width / 64 (ViT) or width · 32 / 64 (ResNet)."""
  if "proj" in state:
    width, _, patch, _ = state["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
    return clip.VisionTransformerConfig(
        image_size=patch * grid, patch_size=patch, width=width, layers=layers,
        heads=heads or width // 64, output_dim=state["proj"].shape[1],
        mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
  if "attnpool.c_proj.weight" in state:
    counts = tuple(len({k.split(".")[0][len("layer"):] + k.split(".")[1] for k in state
                        if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    width = state["layer1.0.conv1.weight"].shape[0]
    spatial = round((state["attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return clip.ModifiedResNetConfig(
        image_size=spatial * 32, layers=counts, width=width, heads=heads or width * 32 // 64,
        output_dim=state["attnpool.c_proj.weight"].shape[0])
  raise errors.UserError("not a CLIP image tower: neither a ViT (visual.proj) nor a ResNet "
                         "(visual.attnpool.*) state dict")


# ---------------------------------------------------------------------------- to Flax


def flax_variables(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """OpenAI-named tensors (no `visual.` prefix) -> {'params', 'batch_stats'} of the Flax tower."""
  generic: dict[str, np.ndarray] = {}
  bare: dict[str, np.ndarray] = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    if key in _BARE:
      bare[key] = value
    elif key.endswith(".in_proj_weight") or key.endswith(".in_proj_bias"):
      base, kind = key.rsplit(".", 1)
      leaf = "weight" if kind == "in_proj_weight" else "bias"
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        generic[f"{base}.{name}.{leaf}"] = part
    else:
      generic[key] = value
  variables = torch_to_flax(generic)
  for key, value in bare.items():
    node = variables["params"]
    *path, leaf = key.split(".")
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return variables


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def check_variables(module: nn.Module, variables: Mapping[str, Any], source: str) -> None:
  """UserError unless `variables` have exactly the names and shapes `module` expects."""
  size = module.config.image_size
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  want, got = _shapes(dict(expected)), _shapes(dict(variables))
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:5]}")
    if unexpected:
      details.append(f"unexpected {unexpected[:5]}")
    if wrong:
      details.append("wrong shapes " + ", ".join(f"{k}: {got[k]} != {want[k]}"
                                                  for k in wrong[:5]))
    raise errors.UserError(f"the CLIP weights in {source!r} do not fit the tower "
                           f"{module.config}: {'; '.join(details)}")


def load_clip(checkpoint: str, name: str = "", dtype: Any = jnp.float32,
              heads: Optional[int] = None) -> tuple[nn.Module, dict[str, Any]]:
  """(tower, variables) from a HF folder or an OpenAI `.pt` file; nothing is downloaded.

  The architecture comes from the checkpoint (HF config.json, or OpenAI tensor shapes with
  `heads` overriding OpenAI's head-count rule). When `name` (a `clip.CLIP_MODELS` key) is given,
  the checkpoint must hold that tower. Variables are {'params', 'batch_stats'} of float32 numpy
  arrays ('batch_stats' is empty for a ViT); apply with `train=False`, the tower is frozen.
  Raises UserError naming where to put the weights when `checkpoint` is empty or absent.
  """
  if name and name not in clip.CLIP_MODELS:
    raise errors.unknown_name("CLIP model", name, clip.CLIP_MODELS)
  if not checkpoint or not os.path.exists(checkpoint):
    raise missing_weights_error(name, checkpoint)
  check_weights_path(checkpoint)
  if os.path.isdir(checkpoint):
    config, state = read_hf_folder(checkpoint)
    if heads is not None:
      config = dataclasses.replace(config, heads=heads)
  else:
    state = read_openai_file(checkpoint)
    config = config_from_openai(state, heads)
  if name and config != clip.CONFIGS[name]:
    raise errors.UserError(f"{checkpoint!r} holds the CLIP tower {config}, not {name!r} "
                           f"({clip.CONFIGS[name]}); fix --config.teacher.name or the "
                           "checkpoint path")
  module = clip.build_clip(config, dtype)
  variables = flax_variables(state)
  check_variables(module, variables, checkpoint)
  return module, variables
