"""The console: in quiet mode everything but the console's own lines (Python prints, native writes to
fd 2, child processes, thread tracebacks) lands in the log file; progress lines are few off a terminal."""

import subprocess
import sys
import textwrap

from progrow_ray.console import Console, fmt_count, fmt_duration

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    from progrow_ray.console import Console

    with Console(sys.argv[1], verbose=sys.argv[2] == "1", interval_s=3600) as con:
        con.stage("stage one")
        print("noise from print")
        os.write(2, b"noise written to fd 2 as native code does\\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('noise from a child\\\\n')"])
        t = threading.Thread(target=lambda: 1 / 0)
        t.start(); t.join()
        con.detail("a detail for the log")
        line = con.progress("phase1", 1000)
        for done in range(0, 1001, 100):
            line.update(done, rate=1000.0, loss=3.0, world=2)
            time.sleep(0.02)
        line.close()
        con.info("verdict: fine")
    print("after the console")
""")


def run(tmp_path, verbose: bool):
    log = tmp_path / "logs" / "run.log"
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p, log.read_text()


def test_quiet_console_shows_only_its_own_lines(tmp_path):
    p, log = run(tmp_path, verbose=False)
    lines = p.stdout.splitlines()
    assert lines[0] == "== stage one" and lines[-2] == "verdict: fine" and lines[-1] == "after the console"
    assert p.stderr == ""  # nothing that looks like an error: the thread's traceback went to the log
    assert "noise" not in p.stdout and "ZeroDivisionError" not in p.stdout
    progress = [
        line for line in lines if line.startswith("phase1")
    ]  # off a terminal: the final line only (interval 1 h)
    assert len(progress) == 1 and "100% 1.0k/1.0k tok" in progress[0] and "world 2" in progress[0]
    for text in (
        "noise from print",
        "noise written to fd 2",
        "noise from a child",
        "ZeroDivisionError",
        "a detail for the log",
        "== stage one",
        "verdict: fine",
    ):
        assert text in log, text


def test_verbose_console_shows_everything(tmp_path):
    p, log = run(tmp_path, verbose=True)
    assert (
        "noise from print" in p.stdout
        and "noise written to fd 2" in p.stderr
        and "ZeroDivisionError" in p.stderr
    )
    assert "a detail for the log" in p.stdout and "verdict: fine" in log


def test_progress_line_text(tmp_path):
    con = Console(stream=open(tmp_path / "out.txt", "w"), interval_s=1e9)
    line = con.progress("search", 36_864)
    line.update(12_288, rate=2_048.0, loss=7.25, note="3 probes")
    assert line.text() == "search     33% 12.3k/36.9k tok  2.0k tok/s  ETA 0:12  loss 7.250  3 probes"
    assert fmt_count(1_500_000_000) == "1.5B" and fmt_duration(3725) == "1:02:05"


def test_progress_off_a_terminal_prints_once_per_interval(tmp_path):
    now = [0.0]
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        con = Console(stream=stream, interval_s=60.0, clock=lambda: now[0])
        line = con.progress("phase2", 100_000)
        for i in range(1, 101):  # 100 updates, 5 s apart: 500 s in all
            now[0] += 5.0
            line.update(i * 1000, loss=4.0)
        line.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 500 // 60 + 1  # one every 60 s, and the final one
    assert lines[-1].startswith("phase2    100% 100.0k/100.0k tok  200 tok/s  loss 4.000  in 8:20")


def test_repeated_polls_without_progress_do_not_drag_the_rate_down(tmp_path):
    now = [0.0]
    with open(tmp_path / "out.txt", "w") as stream:
        line = Console(stream=stream, interval_s=1e9, clock=lambda: now[0]).progress("phase1", 10_000)
        line.update(1000)
        now[0] = 1.0
        line.update(2000)
        for _ in range(5):  # the driver polls every second; the workers are evaluating
            now[0] += 1.0
            line.update(2000)
        assert "1.0k tok/s" in line.text() and "ETA 0:08" in line.text()
