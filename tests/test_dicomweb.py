"""Which archive the screening job screens when the command line and the config both name one (no PACS needed:
the PACS itself is tests/test_pacs.py's)."""

from types import SimpleNamespace

import pytest

from ct3dflow.adapters.dicomweb import DicomWebSource, is_pacs


@pytest.fixture()
def pacs_config(monkeypatch):
    monkeypatch.delenv("CT3DFLOW_PACS_USERNAME", raising=False)
    monkeypatch.delenv("CT3DFLOW_PACS_PASSWORD", raising=False)
    return SimpleNamespace(source={"url": "https://config-pacs.example.org/dicom-web", "lookback_days": 3})


def test_a_folder_on_the_command_line_is_screened_even_where_the_config_names_a_pacs(pacs_config, tmp_path):
    assert not is_pacs(pacs_config, str(tmp_path))
    assert not is_pacs(pacs_config, str(tmp_path / "manifest.parquet"))
    assert is_pacs(pacs_config, None)  # no --archive: the config's PACS
    assert is_pacs(SimpleNamespace(source=None), "dicomweb+http://127.0.0.1:8042/dicom-web")
    assert not is_pacs(SimpleNamespace(source=None), str(tmp_path))


def test_the_command_lines_pacs_url_wins_over_the_configs(pacs_config):
    src = DicomWebSource.from_config("dicomweb+http://127.0.0.1:8042/dicom-web/", pacs_config.source)
    assert src.url == "http://127.0.0.1:8042/dicom-web"
    assert src.lookback_days == 3  # the rest of the source section still applies
    assert DicomWebSource.from_config(None, pacs_config.source).url == "https://config-pacs.example.org/dicom-web"
    with pytest.raises(ValueError, match="http"):
        DicomWebSource.from_config(None, {})


def test_a_relative_credentials_file_is_read_from_the_work_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CT3DFLOW_WORK", str(tmp_path))
    monkeypatch.chdir("/")
    creds = tmp_path / "secrets" / "pacs.json"
    creds.parent.mkdir()
    creds.write_text('{"username": "svc", "password": "pw"}', encoding="utf-8")
    creds.chmod(0o600)
    src = DicomWebSource.from_config("dicomweb+http://127.0.0.1:8042/dicom-web",
                                     {"credentials_file": "secrets/pacs.json"})
    assert (src.username, src.password) == ("svc", "pw")
