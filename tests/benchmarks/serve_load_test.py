"""benchmarks.serve_load: Poisson load on the server, end to end on a tiny model (CPU)."""

import json
import os

import pytest

from tests.conftest import NO_XLA_CACHE


def test_serve_load_smoke(tmp_path):
  import benchmarks.serve_load as sl
  env = dict(os.environ)
  os.environ.update(JAX_PLATFORMS="cpu", **NO_XLA_CACHE)  # the server and helpers inherit them
  try:
    path = sl.main(["--smoke", "--clients", "2", "--out", str(tmp_path)])
  finally:
    os.environ.clear()
    os.environ.update(env)
  (record,) = json.load(open(path))
  assert record["setting"] == "tiny lckv 4 smoke" and record["max_batch"] == 4
  assert [r["rate"] for r in record["results"]][0] == 20.0  # the next unless saturated
  assert record["saturated_tokens_per_s"] > 0 and "sustained" in record
  assert record["prefill_rows"] == 4  # the server's (its default of 8, at most its 4 rows)
  assert record["prefill_tokens_per_tick"] == 8192  # the server's default, read from /metrics
  assert record["busy_steps_per_tick"] == 16  # likewise: twice the 8 steps of a tick
  assert record["max_open"] == 8 and record["incomplete"] is None  # twice the rows, by default
  assert record["results"][-1]["rate"] is None  # the burst: 3 x 4 rows at once
  assert 0 <= record["results"][-1]["peak_running"] <= 4  # sampled from /metrics (may miss rows)
  for r in record["results"]:
    assert r["served"] + r["rejected"] == r["requests"] == 12 and r["served"] > 0
    assert r["failed"] == 0 and r["errors"] == {} and r["max_open"] == 8
    share = r["engine_share"]  # where the engine's loop spent the run
    assert set(share) == {"admit", "prefill", "decode", "emit", "idle"}
    assert abs(sum(share.values()) - 1) < 1e-3 and share["decode"] > 0
    assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert r["clients"] == 2 and 0 < r["client_cpu"] < 2  # two processes sent them
    assert 0 <= r["mean_running"] <= r["peak_running"]  # samples every 0.25 s: may see none
    assert r["server_cpu"] > 0 and 0 < r["engine_cpu"] <= 1.05  # CPU seconds per second
    assert 0 < r["itl_p50_s"] <= r["itl_p99_s"] and 0 < r["tpot_p50_s"] <= r["tpot_p99_s"]


def _result(rate, rps, ttft99, rejected=0, tok=100.0):
  return dict(rate=rate, requests=10, served=10 - rejected, rejected=rejected, requests_per_s=rps,
              output_tokens_per_s=tok, ttft_p50_s=ttft99 / 2, ttft_p99_s=ttft99, itl_p50_s=0.01,
              itl_p99_s=0.02)


def test_sustained_rate_is_the_highest_rate_kept_up_with_under_the_ttft_limit(tmp_path):
  import benchmarks.serve_load as sl
  sweep = [_result(1, 0.98, 0.3, tok=50), _result(2, 1.95, 0.6, tok=90),
           _result(4, 3.5, 1.5, tok=160),  # fell behind the arrivals (< 90% of the rate)
           _result(8, 7.5, 3.0, tok=200),  # p99 TTFT over 2 s
           _result(16, 9.0, 0.5, rejected=3, tok=210)]  # rejected some
  assert sl.sustained_rate(sweep)["rate"] == 2
  assert sl.sustained_rate(sweep, ttft_p99_limit_s=5.0)["rate"] == 8
  assert sl.sustained_rate(sweep[2:4], ttft_p99_limit_s=1.0) is None
  assert sl.saturated_tokens_per_s(sweep) == 210
  # With a burst, its requests/s is the capacity: a short run's achieved rate reads low (its
  # last requests decode after the arrivals end), so a rate within the capacity and the TTFT
  # limit counts even below 90% achieved.
  burst = _result(None, 5.0, 9.0, tok=250)
  assert sl.sustained_rate(sweep + [burst])["rate"] == 4
  assert sl.sustained_rate(sweep + [burst], ttft_p99_limit_s=5.0)["rate"] == 4  # 8 > 5 req/s
  assert sl.saturated_tokens_per_s(sweep + [burst]) == 250
  entries = [dict(label="1b llama", max_batch=8, results=sweep),
             dict(label="1b lckv", max_batch=40, results=sweep[:3])]
  out = sl.plot(entries, str(tmp_path / "load.png"), "title")
  assert os.path.getsize(out) > 10_000
  out = sl.plot([dict(entries[1], results=sweep[:3] + [burst], prompt=[32, 256],  # a star
                      output=[256, 1024])], str(tmp_path / "burst.png"))
  assert os.path.getsize(out) > 10_000
  table = sl.markdown([*entries, dict(label="7b lckv", max_batch=1234, cache_dtype="int8",
                                      prompt=[32, 256], output=[256, 1024],
                                      results=sweep[2:4])]).splitlines()
  assert table[2] == "| 1b llama | bf16 | 32-512 / 32-512 | 8 | 1 x 256 (3) | 8 | 8,192 | 2 | 0.30 / 0.60 | 10.0 / 20.0 | – | – | – | 210 | – |"
  assert table[3] == "| 1b lckv | bf16 | 32-512 / 32-512 | 40 | 1 x 256 (3) | 8 | 8,192 | 2 | 0.30 / 0.60 | 10.0 / 20.0 | – | – | – | 160 | – |"
  assert table[4] == "| 7b lckv | int8 | 32-256 / 256-1024 | 1,234 | 1 x 256 (3) | 8 | 8,192 | none | – | – | – | – | – | 200 | – |"
  burst = dict(_result(None, 5.0, 9.0, tok=250), engine_share=dict(
      admit=0.01, prefill=0.3, decode=0.5, emit=0.09, idle=0.1))
  row = sl.markdown([dict(label="x", max_batch=8, prefill_rows=4, steps_per_tick=16,
                          busy_steps_per_tick=32, prefill_tokens_per_tick=65536, code="abc1234",
                          prefill_chunk=512, prefill_widths=8,
                          results=sweep + [burst])]).splitlines()[2]
  assert row == "| x | bf16 | 32-512 / 32-512 | 8 | 4 x 512 (8) | 16 (32) | 65,536 | 4 | 0.75 / 1.50 | 10.0 / 20.0 | 5.00 | 50% / 30% / 10% | – | 250 | abc1234 |"
  # Against the offline max batch of the same memory (issue 16's 80% target).
  entries = [dict(e, setting=s) for e, s in zip(entries, ("a", "b"))]
  table = sl.markdown(entries, {"a": 300.0}).splitlines()
  assert table[0].endswith("| offline max batch tok/s | saturated / offline | code |")
  assert table[2].endswith("| 210 | 300 | 0.70 | – |") and table[3].endswith("| 160 | – | – | – |")


def test_full_batch_throughput_counts_only_the_time_every_row_was_taken():
  import benchmarks.serve_load as sl
  page = ("# HELP lckv_running_rows x\nlckv_running_rows {r}\nlckv_prefilling_rows {p}\n"
          "lckv_max_batch 8.0\nlckv_generated_tokens_total {t}\n"
          "lckv_requests_total{{outcome=\"completed\"}} 3.0\n")
  samples = [(t, sl._scrape(page.format(r=r, p=p, t=tok)))
             for t, r, p, tok in [(0.0, 0, 4, 0), (1.0, 6, 2, 100), (2.0, 8, 0, 1100),
                                  (3.0, 7, 1, 2100), (4.0, 5, 0, 2600), (5.0, 2, 0, 2800)]]
  assert samples[1][1] == {"lckv_running_rows": 6.0, "lckv_prefilling_rows": 2.0,
                           "lckv_max_batch": 8.0, "lckv_generated_tokens_total": 100.0}
  assert sl.full_batch(samples) == (2.0, 1000.0)  # 1 s -> 3 s: 2,000 tokens
  assert sl.full_batch(samples[:2]) == (0.0, 0.0)
  sweep = [_result(1, 0.98, 0.3, tok=50), dict(_result(None, 9.0, 5.0, tok=300), full_s=4.0,
                                               full_tokens_per_s=450.0)]
  assert sl.saturated_tokens_per_s(sweep) == 450.0  # the full batch, over the ramp-down's
  assert sl.full_batch_tokens_per_s(sweep) == 450.0
  sweep[1]["full_s"] = 0.5  # too short a window to trust: the client's whole-run rate
  assert sl.saturated_tokens_per_s(sweep) == 300.0 and sl.full_batch_tokens_per_s(sweep) is None
  sweep[1]["full_s"], sweep[1]["full_tokens_per_s"] = 4.0, 200.0  # the fill: below the burst's
  assert sl.saturated_tokens_per_s(sweep) == 300.0
  assert sl.sustained_rate(sweep)["rate"] == 1  # the burst has no rate


def test_steady_state_runs_from_the_first_fill_to_the_last_waiting_request():
  import benchmarks.serve_load as sl
  page = "lckv_max_batch 4.0\nlckv_queue_length {q}\nlckv_generated_tokens_total {t}\n"
  samples = [(t, sl._scrape(page.format(q=q, t=tok)))
             for t, q, tok in [(0.0, 8, 0), (1.0, 8, 10), (2.0, 6, 210), (3.0, 3, 510),
                               (4.0, 1, 890), (5.0, 0, 1200), (6.0, 0, 1300)]]
  ends = [1.5, 1.7, 1.9, 2.0, 2.4, 3.3, 4.5, 5.5, 6.0]  # the 4th (rows) ends at 2.0
  assert sl.steady_state(samples, ends, rows=4) == (2.0, 340.0)  # 2 s -> 4 s: 680 tokens
  assert sl.steady_state(samples, ends[:4], rows=4) == (0.0, 0.0)  # no request past the fill
  assert sl.steady_state(samples[:3], ends, rows=4) == (0.0, 0.0)  # one sample in the window
  # The table and the saturated number take the burst's steady state over its other windows.
  burst = dict(_result(None, 9.0, 5.0, tok=300), full_s=4.0, full_tokens_per_s=450.0,
               steady_s=12.4, steady_tokens_per_s=420.0)
  assert sl.saturated_tokens_per_s([_result(1, 0.98, 0.3, tok=50), burst]) == 420.0
  row = sl.markdown([dict(label="x", max_batch=8, results=[burst])]).splitlines()[2]
  assert row.endswith("| 420 (12) | 420 | – |")
  burst.update(steady_running=3456.7)  # the window's mean running rows, where recorded
  row = sl.markdown([dict(label="x", max_batch=8, prefill_chunk=0, results=[burst])])
  assert row.splitlines()[2].endswith("| 420 (12; 3,457 rows) | 420 | – |")
  assert "| 1 x whole |" in row
  burst.update(steady_turnovers=2.08)  # and the times the rows turned over in it
  row = sl.markdown([dict(label="x", max_batch=8, results=[burst])]).splitlines()[2]
  assert row.endswith("| 420 (12; 3,457 rows; 2.1 turnovers) | 420 | – |")
  assert sl.saturated_tokens_per_s([dict(burst, steady_s=0.5)]) == 450.0  # too short


def test_the_steady_window_starts_and_ends_on_the_first_sample_after_a_tick():
  # Ticks end at 1.9, 3.9, 5.9 and 7.9 s, each handing out 800 tokens at once (the engine counts
  # the tick after its tokens); samples every second. Cut at any sample, a window of a few ticks
  # counts a tick more or less than its time: 2.0 s -> 6.5 s reads 2,400 tokens in 4.5 s (533/s)
  # where the server made 400/s.
  import benchmarks.serve_load as sl
  page = ("lckv_max_batch 4.0\nlckv_queue_length {q}\nlckv_generated_tokens_total {t}\n"
          "lckv_decode_ticks_total {n}\nlckv_running_rows {r}\n"
          'lckv_engine_seconds_total{{phase="decode"}} {d}\n'
          'lckv_engine_seconds_total{{phase="prefill"}} {p}\n')
  samples = []
  for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.5, 7.0, 8.0, 9.0):
    ticks = sum(t >= e for e in (1.9, 3.9, 5.9, 7.9))
    m = sl._scrape(page.format(q=9 if t < 8.5 else 0, t=800 * ticks, n=ticks, r=3 + ticks % 2,
                               d=0.5 * t, p=1.5 * t))
    m.update({f"phase {k}": v for k, v in sl.engine_phases(page.format(
        q=0, t=0, n=0, r=0, d=0.5 * t, p=1.5 * t)).items()})
    samples.append((t, m))
  ends = [1.0, 1.5, 1.8, 1.95, 3.0, 6.0, 8.6]  # the 4th (rows) ends at 1.95
  window = sl.steady_window(samples, ends, rows=4)
  assert [t for t, _ in window] == [2.0, 3.0, 4.0, 5.0, 6.0, 6.5, 7.0, 8.0]
  assert sl.steady_state(samples, ends, rows=4) == (6.0, 400.0)  # 2 s -> 8 s: 3 ticks
  assert sl.steady_detail(samples, ends, rows=4) == dict(
      steady_running=3.6, steady_turnovers=0.55,  # 2 ends in it (3.0, 6.0) / 3.625 rows
      steady_engine_share={"decode": 0.25, "prefill": 0.75})
  # Pages without the tick count (records before it): the window as it was, cut anywhere.
  old = [(t, {k: v for k, v in m.items() if k != "lckv_decode_ticks_total"}) for t, m in samples]
  assert [t for t, _ in sl.steady_window(old, ends, rows=4)][0] == 2.0
  assert sl.steady_window(old, ends, rows=4)[-1][0] == 8.0


def test_a_burst_whose_window_saw_under_one_turnover_is_warned_about():
  import benchmarks.serve_load as sl
  short = dict(steady_tokens_per_s=21782.0, steady_turnovers=0.34)
  warning = sl.short_window(short, burst=2.4)
  assert "0.34 times" in warning and "21,782 tokens/s" in warning and "now 2.4" in warning
  assert sl.short_window(dict(short, steady_turnovers=2.09), burst=4) is None
  assert sl.short_window(dict(steady_tokens_per_s=420.0), burst=3) is None  # not recorded


def test_phase_shares_read_the_engine_seconds_of_two_metrics_pages():
  import benchmarks.serve_load as sl
  page = ('# TYPE lckv_engine_seconds_total counter\n'
          'lckv_engine_seconds_total{{phase="decode"}} {d}\n'
          'lckv_engine_seconds_total{{phase="emit"}} {e}\nlckv_max_batch 4.0\n')
  before = sl.engine_phases(page.format(d=1.0, e=0.5))
  assert before == {"decode": 1.0, "emit": 0.5}
  assert sl.phase_shares(before, sl.engine_phases(page.format(d=4.0, e=1.5))) == {
      "decode": 0.75, "emit": 0.25}
  assert sl.phase_shares(before, before) == {}


def test_a_broken_connection_fails_its_request_not_the_run_and_the_client_caps_open_requests():
  """A fake server (a bare asyncio socket server, CPU only) serves each request by its seed:
  whole, dropped before any response, cut mid-stream, or refused with a 429. `run_rate` counts
  them as served, failed (by error name) and rejected, and never holds more than `max_open`
  requests open at once."""
  import asyncio

  import benchmarks.serve_load as sl

  open_now, most = [0], [0]

  async def handle(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    body = json.loads(await reader.readexactly(length)) if length else {}
    if head.startswith(b"GET"):  # /metrics: an empty page
      writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
      await writer.drain()
      writer.close()
      return
    open_now[0] += 1
    most[0] = max(most[0], open_now[0])
    try:
      await asyncio.sleep(0.02)  # held open a while, so that requests overlap
      kind = body["seed"] % 4
      if kind == 1:  # dropped: no response at all
        return
      if kind == 3:
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}")
        return
      writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                   b"Connection: close\r\n\r\n")
      for _ in range(3):
        writer.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        await writer.drain()
        await asyncio.sleep(0.005)
      if kind == 2:  # cut before the usage chunk
        return
      writer.write(b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'
                   b"data: [DONE]\n\n")
    finally:
      open_now[0] -= 1
      await writer.drain()
      writer.close()

  async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
      return await sl.run_rate(f"http://127.0.0.1:{port}", None, 24, [2, 5], [3, 4], vocab=50,
                               seed=100, max_open=5)

  r = asyncio.run(main())
  # Seeds 100..123: six of each kind.
  assert (r["served"], r["rejected"], r["failed"]) == (6, 6, 12)
  assert r["errors"] == {"IncompleteStream": 6, "RemoteProtocolError": 6}
  assert r["max_open"] == 5 and 1 < most[0] <= 5  # overlapping, never more than the cap
  assert r["output_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0
  # A failed request, like a rejected one, means the rate was not kept up with.
  assert sl.sustained_rate([dict(r, rate=1.0, rejected=0)]) is None


def test_a_sweep_keeps_the_points_measured_before_one_that_raises(capsys):
  import benchmarks.serve_load as sl

  def measure(rate, n):
    if rate is None:
      raise OSError("connection reset")
    return dict(rate=rate, requests=n, rejected=0, failed=0, requests_per_s=rate)

  results, incomplete = sl.sweep(measure, [(1.0, 8), (2.0, 16)], burst=40)
  assert [r["rate"] for r in results] == [1.0, 2.0] and incomplete == "OSError: connection reset"
  assert "writing the 2 points measured" in capsys.readouterr().err
  assert sl.sweep(measure, [(1.0, 8)], burst=None) == ([measure(1.0, 8)], None)

  def failing(rate, n):  # a failed request is past saturation: the sweep goes on to the burst
    return dict(rate=rate, requests=n, rejected=0, failed=1 if rate else 0, requests_per_s=rate)

  results, incomplete = sl.sweep(failing, [(1.0, 8), (2.0, 16)], burst=None)
  assert [r["rate"] for r in results] == [1.0] and incomplete is None
  with pytest.raises(OSError):  # nothing measured: the error is the result
    sl.sweep(measure, [], burst=40)
