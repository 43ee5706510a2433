"""SpikeEvent and the JSON-lines event log: one object a line, merged on read, crash-tolerant."""

from __future__ import annotations

import json
import math

import pytest

from spikeguard.events import EventLog, SpikeEvent, read_events
from spikeguard.records import SpikePrediction


def _event(**overrides):
    settings = dict(
        id=40, step=40, kind="grad_norm", z=12.345, loss=2.5, grad_norm=10.0, factor=9.876, loss_factor=1.25,
        baseline_loss=2.0, baseline_grad_norm=1.0125, origin="transformer.h.1", direction="backward",
        operator_ratios={"transformer.h.1": {"msg_norm": 8.0, "out_amax": math.inf, "out_rms": math.nan}},
    )
    settings.update(overrides)
    return SpikeEvent(**settings)


def test_the_log_writes_one_json_object_per_line(tmp_path):
    log = EventLog(tmp_path / "run" / "spikeguard" / "events.jsonl")  # parents are created
    first, second = _event(), _event(id=90, step=90, kind="loss", origin=None, direction=None)
    log.spike(first)
    log.spike(second)
    written = first.to_dict()
    first.outcome, first.recovery_steps = "recovered", 7
    log.outcome(first)

    lines = log.path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 4  # every record ends with a newline
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["type"] for r in records] == ["spike", "spike", "outcome"]
    assert records[0] == {"type": "spike", **written}
    assert written["operator_ratios"]["transformer.h.1"]["out_amax"] == "inf"
    assert records[2] == {"type": "outcome", "id": 40, "step": 40, "outcome": "recovered", "recovery_steps": 7}
    assert list(records[0]) == sorted(records[0])  # keys sorted: stable, diffable logs


def test_read_events_merges_outcomes_into_their_spike(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    late, early = _event(id=90, step=90), _event()
    log.spike(late)
    log.spike(early)
    early.outcome, early.recovery_steps = "recovered", 3
    log.outcome(early)
    late.outcome = "diverged"
    log.outcome(late)
    log.append({"type": "outcome", "id": 12345, "step": 7, "outcome": "recovered", "recovery_steps": 1})  # unknown id

    events = read_events(log.path)
    assert [(e.id, e.outcome, e.recovery_steps) for e in events] == [(40, "recovered", 3), (90, "diverged", None)]
    assert all(isinstance(e, SpikeEvent) for e in events)
    assert events[0].origin == "transformer.h.1" and events[0].z == 12.345


def test_nonfinite_values_round_trip_as_strings(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.spike(_event(kind="nonfinite", z=math.inf, loss=math.nan, grad_norm=-math.inf))
    text = log.path.read_text(encoding="utf-8")
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    assert '"z": "inf"' in text and '"grad_norm": "-inf"' in text  # one encoding: strings
    (event,) = read_events(log.path)
    assert event.z == math.inf and math.isnan(event.loss) and event.grad_norm == -math.inf
    ratios = event.operator_ratios["transformer.h.1"]
    assert ratios["msg_norm"] == 8.0 and ratios["out_amax"] == math.inf and math.isnan(ratios["out_rms"])


@pytest.mark.parametrize("cut", [1, 30, -1])
def test_a_truncated_last_line_is_skipped(tmp_path, cut):
    log = EventLog(tmp_path / "events.jsonl")
    log.spike(_event())
    whole = json.dumps({"type": "spike", **_event(id=90, step=90).to_dict()}, sort_keys=True)
    # A crash mid-write, wherever it stops; cut -1 stops right after a nested "}".
    stop = whole.index("}") + 1 if cut == -1 else cut
    with open(log.path, "a", encoding="utf-8") as f:
        f.write(whole[:stop])
    assert [e.id for e in read_events(log.path)] == [40]
    # The next append first cuts the unfinished line: the new record is never glued onto it.
    with pytest.warns(UserWarning, match=r"ended in a cut-off line \(a crash mid-write\); it was dropped"):
        EventLog(log.path).spike(_event(id=91, step=91))
    assert [e.id for e in read_events(log.path)] == [40, 91]


def test_a_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.spike(_event())
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "spike", "id": \n')
    log.spike(_event(id=90, step=90))
    with pytest.raises(ValueError) as err:
        read_events(path)
    assert str(err.value).startswith(f"{path}:2: not a JSON object (")


def test_records_that_are_not_spike_or_outcome_objects_are_errors(tmp_path):
    path = tmp_path / "events.jsonl"
    spike = json.dumps({"type": "spike", **_event(id=1, step=1).to_dict()})
    path.write_text(spike + '\n{"type": "alert", "id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"events.jsonl:2: unknown record type 'alert' \(expected one of \['spike', 'outcome'\]\)"):
        read_events(path)
    path.write_text(spike + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"events.jsonl:2: not a JSON object \(got list\)"):
        read_events(path)
    path.write_text('{"type": "spike", "step": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"events.jsonl:1: not a spike record \(TypeError: .*missing 7 required positional arguments: 'id', 'kind'"):
        read_events(path)


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "events.jsonl"
    EventLog(path).spike(_event())
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n  \n")
    assert len(read_events(path)) == 1


def test_summary_line():
    assert _event().summary() == (
        "spike #40 at step 40: grad_norm, z=12.3, gradient x9.88 in transformer.h.1 (backward)"
    )
    predicted = _event(origin=None, predicted=SpikePrediction(outcome="recover", k_rec=41.6))
    assert predicted.summary() == "spike #40 at step 40: grad_norm, z=12.3, gradient x9.88, predicted recover in ~42 steps"
    no_k = _event(origin=None, predicted=SpikePrediction(outcome="diverge"))
    assert no_k.summary().endswith("gradient x9.88, predicted diverge")
    assert _event(z=math.inf, factor=math.nan, origin=None).summary() == (
        "spike #40 at step 40: grad_norm, z=inf, gradient xnan"
    )


def test_to_dict_is_plain_json_and_from_dict_inverts_it():
    event = _event(predicted=SpikePrediction(source="probe", m=math.inf, k_rec=3.0, notes=("an estimate",)))
    data = event.to_dict()
    assert data["predicted"]["m"] == "inf" and data["predicted"]["notes"] == ["an estimate"]
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    back = SpikeEvent.from_dict(json.loads(json.dumps(data)))
    assert back.predicted == event.predicted and back.predicted.m == math.inf
    assert back.to_dict() == data
    # Keys a newer version added are ignored; keys an older one lacked take their defaults.
    newer = dict(data, added_later=1)
    del newer["loss_floor"]
    assert math.isnan(SpikeEvent.from_dict(newer).loss_floor)
