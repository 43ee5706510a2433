"""Schedules: exact magnitudes per step and validation."""

import pytest

from spikeguard.perturb import Always, Burst, Decay, Every, Window


def mags(schedule, steps=10):
    return [schedule.magnitude(t) for t in range(steps)]


def test_magnitudes():
    assert mags(Always(), 3) == [1.0, 1.0, 1.0]
    assert mags(Window(2, 4), 6) == [0, 0, 1, 1, 0, 0]
    assert mags(Window(3), 5) == [0, 0, 0, 1, 1]
    assert mags(Burst([5, 1], length=2), 8) == [0, 1, 1, 0, 0, 1, 1, 0]
    assert mags(Burst(3), 5) == [0, 0, 0, 1, 0]
    assert Burst([5, 1]).at_steps == (1, 5)
    assert mags(Every(3), 7) == [1, 0, 0, 1, 0, 0, 1]
    assert mags(Every(3, offset=2), 6) == [0, 0, 1, 0, 0, 1]
    assert mags(Decay(2.0, 0.5), 4) == pytest.approx([2.0, 2.0 / 2**0.5, 2.0 / 3**0.5, 1.0], rel=1e-15)
    assert Decay(1.0, 0.25).magnitude(15) == 0.5
    assert Burst(3).active(3) and not Burst(3).active(4)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Window(-1), "Window.start must be an int >= 0, got -1"),
        (lambda: Window(5, 5), "Window.end must be an int >= 6, got 5"),
        (lambda: Burst([]), "Burst.at_steps must be a non-empty list of steps, got []"),
        (lambda: Burst([1, -2]), "Burst.at_steps[] must be an int >= 0, got -2"),
        (lambda: Burst([1], length=0), "Burst.length must be an int >= 1, got 0"),
        (lambda: Every(0), "Every.n must be an int >= 1, got 0"),
        (lambda: Every(3, offset=3), "Every.offset must be < n=3, got 3"),
        (lambda: Decay(power=-1), "Decay.power must be a number >= 0, got -1"),
        (lambda: Window(1.5), "Window.start must be an int >= 0, got 1.5"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message
