"""The profile summary of ``python -m bench.profile`` (py-spy's collapsed stacks -> shares)."""

from __future__ import annotations

from bench.profile import Profile

RAW = [
    "<module> (factorywatch/cli.py:535);DetectorService.run (detector/mosquitto_shell.py:244);"
    "Client.loop (paho/mqtt/client.py:1625) 6",
    "<module> (factorywatch/cli.py:535);DetectorService.run (detector/mosquitto_shell.py:249);"
    "score (detector/batch_scoring.py:207);FlatForest.score (model/fastforest.py:171) 3",
    "<module> (factorywatch/cli.py:535);DetectorService.run (detector/mosquitto_shell.py:250);"
    "BaseModel.model_validate_json (pydantic/main.py:847) 1",
    "Thread.run (threading.py:982);BaseServer.serve_forever (socketserver.py:233) 2",
    "garbage line without a count",
    "",
]


def test_samples_are_split_by_where_the_innermost_frame_is() -> None:
    """pydantic called by our code is ours; a stack with neither paho nor ours is other."""
    profile = Profile.parse(RAW)
    assert profile.samples == 12
    assert profile.by_where == {"paho-mqtt": 6, "factorywatch": 4, "other": 2}
    assert profile.inclusive["DetectorService.run (detector/mosquitto_shell.py)"] == 10
    assert profile.inclusive["score (detector/batch_scoring.py)"] == 3
    assert profile.self_time["Client.loop (paho/mqtt/client.py)"] == 6


def test_markdown_shows_shares() -> None:
    """The tables give each share in percent of all samples."""
    text = "\n".join(Profile.parse(RAW).markdown(top=3))
    assert "| paho-mqtt | 6 | 50.0 % |" in text
    assert "| `DetectorService.run (detector/mosquitto_shell.py)` | 83.3 % |" in text


def test_the_cpu_split_names_the_part_of_the_innermost_frame_that_has_one() -> None:
    """numpy under the features is scoring, pydantic under the decoder is decoding, the
    verdict codec is publishing, the socket wait is the transport's, the rest is the
    engine's; a thread with no detector frame is other."""
    loop = (
        "DetectorService.turn (factorywatch/detector/mosquitto_shell.py:325);"
        "Runner.handle (factorywatch/detector/runner.py:183);"
        "Engine.handle (factorywatch/detector/engine.py:347)"
    )
    raw = [
        f"{loop};score (factorywatch/detector/batch_scoring.py:240);"
        "compute_features (factorywatch/model/features.py:160);column_stack (numpy/x.py:1) 4",
        f"{loop};Engine._decode (factorywatch/detector/engine.py:360);"
        "JsonIngest.decode (factorywatch/detector/ingest.py:170);"
        "BaseModel.model_validate_json (pydantic/main.py:847) 3",
        f"{loop};Engine._settle (factorywatch/detector/engine.py:559);"
        "encode_verdict (factorywatch/verdict_codec.py:121) 2",
        "DetectorService.turn (factorywatch/detector/mosquitto_shell.py:323);"
        "Mqtt5Transport.receive (factorywatch/detector/mqtt5_transport.py:200);"
        "EpollSelector.select (/usr/lib/python3.11/selectors.py:468) 5",
        f"{loop};AlertTracker.observe (factorywatch/detector/alerting.py:92) 1",
        "Thread.run (threading.py:982);BaseServer.serve_forever (socketserver.py:233) 1",
    ]
    assert Profile.parse(raw).split == {
        "scoring": 4,
        "decode": 3,
        "publish": 2,
        "transport": 5,
        "engine": 1,
        "other": 1,
    }
