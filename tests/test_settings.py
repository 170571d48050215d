"""Settings precedence and validation: defaults < TOML table < FRESHTOWER_X < FRESHTOWER_SECTION_X < flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from streaming.settings import SettingsError, load_settings


@dataclass(frozen=True)
class Example:
    port: int = 1
    rate: float = 0.5
    name: str = "default"
    sync: bool = True
    path: Path = Path("data")
    topics: tuple[str, ...] = ("a",)
    limit: int | None = None


def test_precedence_from_defaults_to_flags(tmp_path):
    config = tmp_path / "freshtower.toml"
    config.write_text('[example]\nport = 2\nname = "toml"\nrate = 3\n[other]\nport = 99\n')
    env = {"FRESHTOWER_PORT": "3", "FRESHTOWER_EXAMPLE_NAME": "scoped", "FRESHTOWER_NAME": "generic"}
    got = load_settings(Example, section="example", config=config, environ=env, overrides={"rate": None})
    # port: TOML 2, then FRESHTOWER_PORT 3; name: the section-scoped variable beats the generic one;
    # rate: TOML's integer 3 becomes a float, and an override of None means "not given".
    assert got == Example(port=3, rate=3.0, name="scoped")
    got = load_settings(Example, section="example", config=config, environ=env, overrides={"port": 4})
    assert got.port == 4


def test_environment_strings_are_converted():
    env = {
        "FRESHTOWER_SYNC": "off",
        "FRESHTOWER_PATH": "/tmp/x",
        "FRESHTOWER_TOPICS": "a, b,c",
        "FRESHTOWER_LIMIT": "7",
    }
    got = load_settings(Example, section="example", environ=env)
    assert (got.sync, got.path, got.topics, got.limit) == (False, Path("/tmp/x"), ("a", "b", "c"), 7)
    assert load_settings(Example, section="example", environ={"FRESHTOWER_LIMIT": "none"}).limit is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FRESHTOWER_PORT": "eighty"}, "setting 'port': expected int, got 'eighty'"),
        ({"FRESHTOWER_SYNC": "maybe"}, "setting 'sync': expected a boolean (true/false), got 'maybe'"),
    ],
)
def test_bad_values_say_what_was_expected(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(Example, section="example", environ=env)


def test_unknown_names_are_refused(tmp_path):
    config = tmp_path / "freshtower.toml"
    config.write_text("[example]\nprot = 2\n")
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) \['prot'\]"):
        load_settings(Example, section="example", config=config, environ={})
    with pytest.raises(SettingsError, match="unknown setting 'speed'"):
        load_settings(Example, section="example", environ={}, overrides={"speed": 1})


def test_the_worker_follows_the_logq_weight_its_model_was_trained_with():
    from streaming.learner import LearnerSettings
    from streaming.worker_settings import WorkerSettings

    trained = {"logq": True, "logq_weight": 0.5}
    # Unset: the online learner pursues the objective of the nightly model it updates.
    assert WorkerSettings().learner(trained).logq_weight == 0.5
    # A version whose manifest has no training settings (or none for the weight): the full correction.
    assert WorkerSettings().learner(None).logq_weight == 1.0
    assert WorkerSettings().learner({"logq": True}).logq_weight == 1.0
    # Set explicitly, the worker's own value wins.
    assert WorkerSettings(logq_weight=0.25).learner(trained).logq_weight == 0.25
    loaded = load_settings(WorkerSettings, section="worker", environ={"FRESHTOWER_LOGQ_WEIGHT": "0.75"})
    assert loaded.learner(trained).logq_weight == 0.75
    with pytest.raises(ValueError, match="logq_weight"):
        LearnerSettings(logq_weight=-1.0)


def test_kafka_client_config_carries_tls_sasl_and_the_codec(tmp_path) -> None:
    from streaming.settings import KafkaSettings

    ca, cert, key, secret = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key", "password"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----\n")
    secret.write_text("s3cr3t-from-file\n")
    env = {
        "FRESHTOWER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FRESHTOWER_KAFKA_SSL_CAFILE": str(ca),
        "FRESHTOWER_KAFKA_SSL_CERTFILE": str(cert),
        "FRESHTOWER_KAFKA_SSL_KEYFILE": str(key),
        "FRESHTOWER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FRESHTOWER_KAFKA_SASL_USERNAME": "worker",
        "FRESHTOWER_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "FRESHTOWER_KAFKA_COMPRESSION": "zstd",
    }
    settings = load_settings(KafkaSettings, section="kafka", environ=env)
    assert settings.client_config() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": "s3cr3t-from-file",  # read from the file, the newline stripped
    }
    assert settings.producer_config()["compression_type"] == "zstd"
    assert KafkaSettings().producer_config()["compression_type"] is None
    # The password from the environment is never part of the settings' repr (settings may be logged).
    plain = load_settings(
        KafkaSettings,
        section="kafka",
        environ={**env, "FRESHTOWER_KAFKA_SASL_PASSWORD_FILE": "", "FRESHTOWER_KAFKA_SASL_PASSWORD": "pw-in-env"},
    )
    assert plain.client_config()["sasl_plain_password"] == "pw-in-env" and "pw-in-env" not in repr(plain)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"compression": "brotli"}, "compression: expected one of"),
        ({"security_protocol": "TLS"}, "security_protocol: expected one of"),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs a password"),
        ({"security_protocol": "SASL_SSL", "sasl_password": "p"}, "needs sasl_username"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI", "sasl_username": "u"}, "sasl_mechanism"),
        ({"ssl_certfile": "/nonexistent/client.pem"}, "go together"),
        ({"ssl_cafile": "/nonexistent/ca.pem"}, "is not a readable file"),
    ],
)
def test_kafka_settings_refuse_what_no_client_could_use(fields, message) -> None:
    from pathlib import Path

    from streaming.settings import KafkaSettings

    fields = {k: Path(v) if k.startswith("ssl_") else v for k, v in fields.items()}
    with pytest.raises(SettingsError, match=message):
        KafkaSettings(**fields)
