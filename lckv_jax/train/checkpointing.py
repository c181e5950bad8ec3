"""Training checkpoints: orbax CheckpointManager under `<workdir>/checkpoints`, kept safe.

A step holds `state` (params, optimizer state as a flat list of leaves, step), `data` (the data
iterator state and a fingerprint of `state`) and `config` (the whole run config as JSON).

What keeps a user's checkpoints safe:
- A step is written only from a finite state (the trainer checks every step's loss, gradient
  norm and parameter norm first), so rotation (`keep`, at least 1) never drops the newest
  finite checkpoint for a diverged one.
- Restoring walks back from the newest step. A step that orbax cannot read, whose arrays are not
  finite, or whose arrays do not match the fingerprint written with them is damaged: once an
  older step restores, the damaged newer ones are moved aside to
  `<workdir>/checkpoints_damaged/<step>.<why>` (with a WHY.txt), never deleted, so the run goes
  on past them without colliding with their step numbers.
- If no step is readable, restoring refuses (`CheckpointError`) and moves nothing: the run never
  starts again from step 0 over checkpoints it could not read.
Arrays are restored onto the shardings of the current mesh, so a run may resume on a different
mesh or device count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lckv_jax.cli import UserError

DAMAGED_DIR = "checkpoints_damaged"


class CheckpointError(UserError):
  """Checkpoints exist but none can be restored; nothing was moved or deleted."""


def _flatten(state: dict) -> dict:
  leaves = jax.tree.leaves(state["opt_state"])
  return {"params": state["params"], "step": state["step"],
          "opt_state": {str(i): x for i, x in enumerate(leaves)}}


def _unflatten(flat: dict, template: dict) -> dict:
  treedef = jax.tree.structure(template["opt_state"])
  leaves = [flat["opt_state"][str(i)] for i in range(treedef.num_leaves)]
  return {"params": flat["params"], "step": flat["step"],
          "opt_state": jax.tree.unflatten(treedef, leaves)}


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (one per element), for an exact, order-free checksum."""
  bits = jnp.dtype(x.dtype).itemsize * 8
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if bits == 64:  # only with jax_enable_x64: fold the two halves
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w[..., 0] ^ w[..., 1]
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


@jax.jit
def _fingerprint_and_finite(state: dict) -> tuple[list, jax.Array]:
  leaves = jax.tree.leaves(state)
  sums = [jnp.sum(_words(x), dtype=jnp.uint32) for x in leaves]
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)]))
  return sums, finite


def fingerprint(state: dict) -> tuple[list[int], bool]:
  """(per-leaf uint32 sums of the state's bits, whether every float leaf is finite)."""
  sums, finite = jax.device_get(_fingerprint_and_finite(state))
  return [int(s) for s in sums], bool(finite)


def _first_line(e: BaseException) -> str:
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def has_steps(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a step (readable or not)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"config.checkpoint.keep must be an integer >= 1, got {keep!r}")
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def save(self, step: int, state: dict, data_state: dict, config_json: str) -> None:
    """Writes `state` at `step` (asynchronously); refuses a non-finite state."""
    sums, finite = fingerprint(state)
    if not finite:  # the trainer stops before this; a last line of defence for the rotation
      raise RuntimeError(f"refusing to save a non-finite state at step {step}")
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flatten(state)),
        data=ocp.args.JsonSave({**data_state, "fingerprint": sums}),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _read(self, step: int, target: dict, abstract_state: dict, check_config):
    """(state, data) of one step, or a (why, detail) pair saying why it is damaged."""
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # noqa: BLE001 - any failure to read is damage, reported below
      return "unreadable", _first_line(e)
    if check_config is not None:
      check_config(dict(saved))  # a changed model is the user's error, not damage: propagate
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      return "unreadable", _first_line(e)
    state, data = _unflatten(out["state"], abstract_state), dict(out["data"])
    sums, finite = fingerprint(state)
    if not finite:
      return "nonfinite", "the state holds NaN or Inf values"
    expected = data.pop("fingerprint", None)
    if expected is not None and list(expected) != sums:
      bad = [i for i, (a, b) in enumerate(zip(expected, sums)) if a != b]
      return "corrupt", f"{len(bad)} array(s) differ from the checksums written with them"
    return state, data

  def restore(self, abstract_state: dict, check_config=None, move_damaged: bool = True):
    """(step, state, data_state) of the newest intact checkpoint, or None if there is none.

    `abstract_state` is the state's tree of `jax.ShapeDtypeStruct` with shardings: the arrays
    are restored onto those shardings, whatever mesh wrote them. `check_config(saved)` gets the
    saved config (a dict) before the state is read; what it raises propagates. Damaged steps
    newer than the one restored are moved aside (with `move_damaged`; a reader such as
    evaluation leaves them); if none restores, `CheckpointError`.
    """
    from lckv_jax.checkpoint import drop_closed_loop_noise
    drop_closed_loop_noise()  # a damaged step's abandoned reads report a closed loop later
    target = _flatten(abstract_state)
    damaged = []
    for step in reversed(self.all_steps()):
      got = self._read(step, target, abstract_state, check_config)
      if isinstance(got[0], str):
        logging.warning("checkpoint step %d in %s is damaged (%s: %s); trying an older one",
                        step, self.directory, *got)
        damaged.append((step, *got))
        continue
      if move_damaged and damaged:
        for bad in damaged:
          self._move_aside(*bad)
        self.manager.reload()
      return step, got[0], got[1]
    if damaged:
      listing = "; ".join(f"step {s}: {why} ({detail})" for s, why, detail in damaged)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored ({listing}). Nothing was moved or "
          "deleted. Fix or move them away to start again, or use a new --workdir")
    return None

  def _move_aside(self, step: int, why: str, detail: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(self.workdir, DAMAGED_DIR)
    dst = os.path.join(dst_dir, f"{step}.{why}")
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(dst_dir, f"{step}.{why}.{n}")
    if jax.process_index() == 0:
      os.makedirs(dst_dir, exist_ok=True)
      shutil.move(src, dst)
      with open(os.path.join(dst, "WHY.txt"), "w") as f:
        f.write(f"step {step} was moved here from {src} because it is {why}: {detail}\n")
      logging.warning("moved the damaged checkpoint of step %d to %s", step, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"lckv_move_aside_{step}")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

