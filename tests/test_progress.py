"""Each long stage logs its time under the "fxtp" logger (fxtp/progress.py)."""
import io
import logging
import re
import time

import pytest

import fxtp
from fxtp.progress import LOGGER, configure_logger, stage
from fxtp.tiny_configs import tiny_model


@pytest.fixture
def fresh_logger():
    """The fxtp logger as a new process finds it; its handlers and level restored afterwards."""
    saved = LOGGER.handlers[:], LOGGER.level
    LOGGER.handlers.clear()
    yield LOGGER
    LOGGER.handlers[:], LOGGER.level = saved


def own_handler(logger) -> logging.Handler:
    return next(handler for handler in logger.handlers if getattr(handler, "fxtp_own", False))


def stream_into(logger) -> io.StringIO:
    stream = io.StringIO()
    own_handler(logger).setStream(stream)
    return stream


def test_compile_logs_export_and_plan_times(fresh_logger, monkeypatch):
    monkeypatch.delenv("FXTP_VERBOSITY", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    stream = stream_into(configure_logger())
    fxtp.compile(tiny_model("llama"), 2)
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("fxtp: torch.export of LlamaForCausalLM: ") and line.endswith(" s") for line in lines)
    assert any(line.startswith("fxtp: plan over 2 ranks: ") for line in lines), lines


@pytest.mark.parametrize("verbosity, rank, shown", [("warning", "0", False), ("info", "1", False), ("debug", "0", True)])
def test_verbosity_and_other_ranks(fresh_logger, monkeypatch, verbosity, rank, shown):
    monkeypatch.setenv("FXTP_VERBOSITY", verbosity)
    monkeypatch.setenv("RANK", rank)
    logger = configure_logger()
    stream = stream_into(logger)
    logger.info("a stage: 1.0 s")
    logger.warning("a warning")
    assert stream.getvalue().splitlines() == ["fxtp: a stage: 1.0 s"] * shown + ["fxtp: a warning"]


def test_a_logger_the_user_configured_is_left_alone(fresh_logger, monkeypatch):
    handler = logging.NullHandler()
    fresh_logger.addHandler(handler)
    fresh_logger.setLevel(logging.ERROR)
    monkeypatch.setenv("FXTP_VERBOSITY", "debug")
    configure_logger()
    assert not any(getattr(h, "fxtp_own", False) for h in fresh_logger.handlers) and handler in fresh_logger.handlers
    assert fresh_logger.level == logging.ERROR


def test_an_unknown_verbosity_says_what_to_use(fresh_logger, monkeypatch):
    monkeypatch.setenv("FXTP_VERBOSITY", "loud")
    with pytest.raises(ValueError, match="FXTP_VERBOSITY='loud': use one of error, warning, info, debug"):
        configure_logger()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("verbosity, terminal, shown", [("info", True, True), ("warning", True, False),
                                                       ("info", False, False)])
def test_a_terminal_shows_the_stage_under_way_with_its_time(fresh_logger, monkeypatch, verbosity, terminal, shown):
    monkeypatch.setenv("FXTP_VERBOSITY", verbosity)
    monkeypatch.delenv("RANK", raising=False)
    logger = configure_logger()
    stream = Terminal() if terminal else io.StringIO()
    own_handler(logger).setStream(stream)
    with stage("a slow stage"):
        time.sleep(0.7)  # the clock ticks every 0.5 s
    text = stream.getvalue()
    clock = re.findall(r"fxtp: a slow stage \[(\d\d:\d\d)\]", text)
    assert bool(clock) == shown, text
    if shown:
        assert len(clock) >= 2  # drawn at the start, then ticked
        assert text.rstrip().endswith("fxtp: a slow stage: 0.7 s")  # the line cleared, then the log line
    assert ("fxtp: a slow stage: 0.7 s" in text) == (verbosity == "info")
