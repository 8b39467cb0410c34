"""The shared pieces of tuna_jax/io: strict JSONL reading, the settings sidecar, the output lock, the item
loop and the one-line CLI errors -- on real files."""
import json
import os
import threading
import time

import pytest

from tuna_jax.io import cli as io_cli
from tuna_jax.io.errors import InputError
from tuna_jax.io.items import ItemOutcome, run_items
from tuna_jax.io.jsonl import check_settings, dumps, iter_jsonl, read_json, read_out_lines, read_text
from tuna_jax.io.lock import OutputBusyError, OutputLock
from tuna_jax.llm_api.store import BudgetExceeded


# ------------------------------------------------------------------------------------------ errors
def test_input_error_is_one_line_with_place_and_field():
    e = InputError("data.jsonl:3", "candidates[1]", "empty response", reason="empty_response")
    assert str(e) == "data.jsonl:3: field 'candidates[1]': empty response"
    assert (e.where, e.field, e.reason) == ("data.jsonl:3", "candidates[1]", "empty_response")
    e = InputError("data.jsonl:3: expected a JSON object, got list")
    assert str(e) == "data.jsonl:3: expected a JSON object, got list" and e.where is None
    # every reader's old name is this one class
    from tuna_jax.data.records import DataError
    from tuna_jax.eval.common import InputError as EvalInputError
    from tuna_jax.model.convert import ConversionError
    assert DataError is InputError and EvalInputError is InputError and issubclass(ConversionError, InputError)


# ------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("content,message", [
    (b'{"a": 1}\n{"b": "caf\xe9"}\n', r"in\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"),
    (b'{"a": 1}\n\n{"b": NaN}\n', r"in\.jsonl:3: NaN is not a JSON number"),
    (b'{"a": -Infinity}\n', r"in\.jsonl:1: -Infinity is not a JSON number"),
    (b'{"a": 1}\n{"a": \n', r"in\.jsonl:2: not valid JSON \(Expecting value at column 7\)"),
    (b'[1, 2]\n', r"in\.jsonl:1: expected a JSON object, got list"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "in.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(iter_jsonl(p))


def test_jsonl_accepts_a_byte_order_mark_and_blank_lines(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": 2}')
    assert [(n, obj) for n, _, obj in iter_jsonl(p)] == [(1, {"a": 1}), (4, {"b": 2})]
    with pytest.raises(InputError, match=r"nope\.jsonl: predictions file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl", what="predictions file"))


def test_whole_files_name_the_line_of_bad_bytes_and_bad_json(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b'{\n "a": 1,\n "b": "\xff"\n}')
    with pytest.raises(InputError, match=r"t\.json:3: not UTF-8 text \(byte 0xff at column 8\)"):
        read_text(p)
    p.write_text('{\n "a": 1,\n "b": \n}')
    with pytest.raises(InputError, match=r"t\.json:4: not valid JSON"):
        read_json(p)


def test_dumps_never_writes_nan():
    assert dumps({"a": "é", "b": [1.5]}) == '{"a": "é", "b": [1.5]}'
    with pytest.raises(ValueError):
        dumps({"score": float("nan")})


def test_read_out_lines_cuts_a_torn_last_line(tmp_path, caplog):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"i": 0}\nnot json\n{"i": 2, "tor')
    got = list(read_out_lines(str(p)))
    assert got == [(f"{p}:1", {"i": 0}), (f"{p}:2", None)]
    assert p.read_bytes() == b'{"i": 0}\nnot json\n' and "incomplete last line" in caplog.text


def test_settings_sidecar(tmp_path):
    out = str(tmp_path / "out.jsonl")
    check_settings(out, {"n": 4, "seed": 0})  # fresh OUT: written
    assert json.loads(open(out + ".params.json").read()) == {"n": 4, "seed": 0}
    check_settings(out, {"n": 2, "seed": 0})  # OUT still empty: nothing to mix, rewritten
    open(out, "w").write('{"i": 0}\n')
    check_settings(out, {"n": 2, "seed": 0})  # same settings: fine
    with pytest.raises(InputError, match=r"out\.jsonl\.params\.json: .*other settings \(n: 2 -> 3\); try again"):
        check_settings(out, {"n": 3, "seed": 0}, hint="try again")


# ------------------------------------------------------------------------------------------ the lock
def test_output_lock_is_exclusive_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "sub" / "out.jsonl")
    with OutputLock(out):
        assert open(out + ".lock").read() == str(os.getpid())
        with pytest.raises(OutputBusyError, match=rf"out\.jsonl is being written by another run \(process "
                                                   rf"{os.getpid()}\)"):
            OutputLock(out).acquire()
    assert not os.path.exists(out + ".lock")
    with OutputLock(out):  # free again
        pass


def test_a_rewritten_output_is_set_aside_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with OutputLock(str(out), rewrites=True):  # a run that stops before its output is complete
        assert not out.exists()
    assert (tmp_path / "out.jsonl.previous").read_text() == "old\n"
    with OutputLock(str(out), rewrites=True) as lock:  # a run that finishes
        out.write_text("new\n")
        lock.commit()
    assert out.read_text() == "new\n" and not (tmp_path / "out.jsonl.previous").exists()
    with OutputLock(str(out)):  # an appending command (generate, sample-diverse) leaves OUT where it is
        assert out.exists()


# ------------------------------------------------------------------------------------------ the item loop
def _work(i):
    if i == 7:
        raise BudgetExceeded("stop")
    if i == 9:
        raise AttributeError("'str' object has no attribute 'get'")  # a bug or a strange reply in one item
    time.sleep(0.001 * ((i * 7) % 5))  # finish out of order
    if i % 4 == 3:
        return ItemOutcome(failure={"i": i}, counters={"bad": 1})
    return ItemOutcome(record={"i": i}, counters={"good": 1})


def test_run_items_orders_output_and_counts_item_exceptions(tmp_path):
    out = str(tmp_path / "out.jsonl")
    s = run_items([0, 1, 2, 3, 4, 5, 6, 8, 9, 10], _work, out, concurrency=3, progress=False)
    assert [json.loads(x)["i"] for x in open(out)] == [0, 1, 2, 4, 5, 6, 8, 10]
    failed = [json.loads(x) for x in open(out + ".failed.jsonl")]
    assert failed[0] == {"i": 3}
    assert failed[1]["id"] == 8 and failed[1]["error"] == "AttributeError: 'str' object has no attribute 'get'"
    assert s.counters == {"good": 8, "bad": 1, "item_error": 1} and s.written == 8 and s.failed == 2
    assert not os.path.exists(out + ".lock") and not os.path.exists(out + ".partial")


def test_run_items_stop_keeps_the_prefix_and_moves_the_old_output_aside(tmp_path):
    out = str(tmp_path / "out.jsonl")
    run_items([0, 1, 3], _work, out, progress=False)
    old = open(out).read()
    with pytest.raises(BudgetExceeded) as ei:
        run_items(list(range(12)), _work, out, concurrency=1, progress=False)
    assert ei.value.summary.stopped == "budget"
    # The finished file of the earlier run no longer looks like this run's result.
    assert not os.path.exists(out) and open(out + ".previous").read() == old
    assert not os.path.exists(out + ".failed.jsonl")  # the old failure list is gone too
    assert [json.loads(x)["i"] for x in open(out + ".partial")] == [0, 1, 2, 4, 5, 6]
    run_items([0, 1, 2], _work, out, progress=False)  # a finished run cleans up
    assert os.path.exists(out) and not os.path.exists(out + ".previous")


def test_two_runs_on_one_output_never_both_run(tmp_path):
    out = str(tmp_path / "out.jsonl")
    started, release = threading.Event(), threading.Event()

    def slow(i):
        started.set()
        release.wait(10)
        return ItemOutcome(record={"i": i})

    t = threading.Thread(target=run_items, args=([0], slow, out), kwargs={"progress": False})
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(OutputBusyError):
            run_items([0], _work, out, progress=False)
    finally:
        release.set()
        t.join(10)
    assert [json.loads(x) for x in open(out)] == [{"i": 0}]


# ------------------------------------------------------------------------------------------ one-line errors
def _raise(exc):
    def f(args):
        raise exc
    return f


@pytest.mark.parametrize("exc,line", [
    (InputError("a.jsonl:2", "x", "bad"), "a.jsonl:2: field 'x': bad"),
    (FileNotFoundError(2, "No such file or directory", "/no/such"), "/no/such: No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/x"), "/root/x: Permission denied"),
    (UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid"),
     "text is not UTF-8 (byte 0xe9 at offset 3); save the file as UTF-8"),
    (KeyError("no tensor 'x'"), "no tensor 'x'"),
    (ValueError("line one\nline two"), "line one line two"),
    (OutputBusyError("o.jsonl is being written by another run"), "o.jsonl is being written by another run"),
])
def test_user_errors_are_one_line(capsys, exc, line):
    assert io_cli.run_command("tuna-jax x", _raise(exc), None) == 2
    err = capsys.readouterr().err
    assert err == f"tuna-jax x: error: {line}\n"


def test_safetensors_error_is_one_line(tmp_path, capsys):
    from safetensors import safe_open

    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x10\x00")

    def f(args):
        with safe_open(str(p), framework="numpy"):
            pass

    assert io_cli.run_command("tuna-jax x", f, None) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuna-jax x: error: safetensors: ") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        io_cli.run_command("tuna-jax x", lambda a: 1 / 0, None)
