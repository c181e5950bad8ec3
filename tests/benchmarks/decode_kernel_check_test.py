"""benchmarks/decode_kernel_check.py: the kernel and block sweep runs (in the interpreter here)."""

from benchmarks import decode_kernel_check


def test_the_sweep_checks_each_kernel_and_block_against_the_reference(capsys):
  decode_kernel_check.main(["--interpret", "--kernels", "pallas", "mosaic", "--block_k", "64",
                            "128"])
  lines = capsys.readouterr().out.splitlines()
  runs = [line for line in lines if "block" in line]
  assert len(runs) == 2 * 2 * 2  # 2 valid lengths x 2 kernels x 2 blocks
  assert all("max err" in line for line in runs), runs  # each ran and matched the reference


def test_the_sweep_reads_a_quantized_cache_with_one_and_two_heads_a_program(capsys):
  decode_kernel_check.main(["--interpret", "--cache_dtype", "int8", "--heads", "1", "2"])
  runs = [line for line in capsys.readouterr().out.splitlines() if "block" in line]
  assert len(runs) == 2 * 2 and all("max err" in line for line in runs), runs
  assert sum("heads 2" in line for line in runs) == 2
