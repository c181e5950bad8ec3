"""The run's workdir: checked once at start, and held by one process at a time.

`<workdir>/.lock` is taken with `flock`, which the kernel releases when the process ends in any
way (kill -9 included), so a stale lock never blocks; a second run on the same workdir refuses at
once, naming the host and pid written in the file by the first. Only process 0 of a multi-host
run takes it (the other processes share the workdir by design).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from lckv_jax.cli import UserError

LOCK_FILE = ".lock"


def check_writable_dir(path: str, flag: str = "--workdir") -> str:
  """The absolute path of a directory we can write (created if missing), else a UserError."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{flag}={path} is not a writable directory ({e.strerror or e})") from None
  return path


def check_new_target(path: str, flag: str) -> str:
  """A destination that must not hold anything yet (an empty directory is fine)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
    raise UserError(f"{flag}={path} already exists and is not empty; choose a new directory "
                    "(nothing is ever overwritten)")
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.access(parent, os.W_OK):
    raise UserError(f"{flag}={path}: {parent} is not writable")
  return path


class WorkdirLock:
  """A context manager holding `<workdir>/.lock` for this process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = None

  def __enter__(self):
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot create the lock file {self.path} ({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        os.close(fd)  # a filesystem without flock: run unlocked rather than not at all
        return self
      holder = _read_holder(self.path)
      os.close(fd)
      raise UserError(
          f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
          "it or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)}).encode() + b"\n")
    os.fsync(fd)
    self.fd = fd
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def _read_holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return (f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}: "
            f"{info.get('command', '')}")
  except (OSError, ValueError):
    return f"see {path}"
