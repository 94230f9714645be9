"""cni.conflist with input a runtime should not send: refused before any plugin runs
(issue 12, defect 9). No root: the plugin is a script that records that it ran."""
import os

import pytest

from cni import conflist, errors
from cni.conflist import RuntimeConf
from cni.errors import CNIError

LIST = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "recorder"}]}


@pytest.fixture
def recorder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ran"
    path = bin_dir / "recorder"
    path.write_text("#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND\" >> %s\n"
                    "echo '{\"cniVersion\": \"1.0.0\"}'\n" % log)
    path.chmod(0o755)
    return str(bin_dir), log


@pytest.mark.parametrize("field", ["container_id", "netns", "ifname"])
@pytest.mark.parametrize("command", ["add", "delete", "check"])
def test_nul_in_the_runtime_config_is_invalid_env(recorder, tmp_path, field, command):
    """Regression: posix_spawn raised ValueError ("embedded null byte"), a traceback."""
    bin_dir, log = recorder
    values = {"container_id": "c1", "netns": "/run/netns/p", "ifname": "eth0"}
    values[field] += "\x00x"
    rt = RuntimeConf(values["container_id"], values["netns"], values["ifname"], cache_dir=str(tmp_path / "c"))
    with pytest.raises(CNIError) as e:
        getattr(conflist, command)(conflist.load(LIST), rt, [bin_dir])
    assert e.value.code == errors.INVALID_ENV
    assert not log.exists()


def test_nul_in_cni_args_is_invalid_env(recorder, tmp_path):
    bin_dir, log = recorder
    rt = RuntimeConf("c1", "/run/netns/p", args=[("K", "v\x00")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(CNIError) as e:
        conflist.add(conflist.load(LIST), rt, [bin_dir])
    assert e.value.code == errors.INVALID_ENV
    assert not log.exists()


def test_an_id_too_long_for_the_cache_is_refused_before_add(recorder, tmp_path):
    """Regression: the plugins' ADD ran, then writing the cache file (named by network,
    container ID and ifname) failed with ENAMETOOLONG: a traceback, the attachment
    made but not cached, so no DEL would ever find it."""
    bin_dir, log = recorder
    rt = RuntimeConf("c" * 300, "/run/netns/p", cache_dir=str(tmp_path / "c"))
    with pytest.raises(CNIError) as e:
        conflist.add(conflist.load(LIST), rt, [bin_dir])
    assert e.value.code == errors.INVALID_ENV and "too long" in e.value.msg
    assert not log.exists()
    # Without a cache to write (DEL of such an ID, e.g. after a runtime's own ADD) it runs.
    conflist.delete(conflist.load(LIST), rt, [bin_dir])
    assert log.read_text().split() == ["DEL"]


def test_cache_write_failure_is_an_io_error(recorder, tmp_path):
    bin_dir, _ = recorder
    blocker = tmp_path / "c"
    blocker.write_text("a file where the cache directory should be")
    rt = RuntimeConf("c1", "/run/netns/p", cache_dir=str(blocker))
    with pytest.raises(CNIError) as e:
        conflist.add(conflist.load(LIST), rt, [bin_dir])
    assert e.value.code == errors.IO_FAILURE
    assert os.path.isfile(blocker)
