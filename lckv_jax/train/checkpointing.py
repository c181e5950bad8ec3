"""Training checkpoints: orbax CheckpointManager under `<workdir>/checkpoints`.

A step holds `state` (params, optimizer state as a flat list of leaves, step), `data` (the data
iterator state) and `config` (the whole run config as JSON). Restoring walks back from the newest
step, skipping (with a warning) any that fails to read. Arrays are restored onto the shardings of
the current mesh, so a run may resume on a different mesh or device count.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp


def _flatten(state: dict) -> dict:
  leaves = jax.tree.leaves(state["opt_state"])
  return {"params": state["params"], "step": state["step"],
          "opt_state": {str(i): x for i, x in enumerate(leaves)}}


def _unflatten(flat: dict, template: dict) -> dict:
  treedef = jax.tree.structure(template["opt_state"])
  leaves = [flat["opt_state"][str(i)] for i in range(treedef.num_leaves)]
  return {"params": flat["params"], "step": flat["step"],
          "opt_state": jax.tree.unflatten(treedef, leaves)}


def _warn_unreadable(step: int, directory: str, e: Exception) -> None:
  logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                  step, directory, type(e).__name__, str(e).splitlines()[0][:200])


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def save(self, step: int, state: dict, data_state: dict, config_json: str) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flatten(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, abstract_state: dict, check_config=None):
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

    `abstract_state` is the state's tree of `jax.ShapeDtypeStruct` with shardings: the arrays
    are restored onto those shardings, whatever mesh wrote them. `check_config(saved)` gets the
    saved config (a dict) before the state is read; what it raises propagates.
    """
    self.manager.reload()
    target = jax.tree.map(lambda x: x, _flatten(abstract_state))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
      except Exception as e:
        _warn_unreadable(step, self.directory, e)
        continue
      if check_config is not None:
        check_config(dict(saved))
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
      except Exception as e:  # a partial or corrupt step: fall back to an older one
        _warn_unreadable(step, self.directory, e)
        continue
      return step, _unflatten(out["state"], abstract_state), dict(out["data"])
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
