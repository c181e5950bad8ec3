"""benchmarks/decode_kernel_check.py: the kernel and block sweep runs (in the interpreter here)."""

from benchmarks import decode_kernel_check


def test_the_sweep_checks_each_kernel_and_block_against_the_reference(capsys):
  decode_kernel_check.main(["--interpret", "--kernels", "pallas", "mosaic", "--block_k", "64",
                            "128"])
  lines = capsys.readouterr().out.splitlines()
  runs = [line for line in lines if "block" in line]
  assert len(runs) == 2 * 2 * 2  # 2 valid lengths x 2 kernels x 2 blocks
  assert all("max err" in line for line in runs), runs  # each ran and matched the reference
