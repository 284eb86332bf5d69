"""Every golden file names the official sources it was produced from, by commit and by sha256.

tests/golden/common.py's ``OFFICIAL`` is the generator's input list: per architecture, each official
file's path, commit and the sha256 of its bytes at that commit; make_golden.py refuses to run on a
copy whose hash differs (``check_official_copy``). Each ``<name>.pt`` records the commits and the
hashes; here they must be those of its architecture's entry, so a golden file cannot silently come
from, or be described as coming from, other sources than the generator checks.
"""

import hashlib
import re

import pytest

from golden.common import (ALL_CONFIGS, OFFICIAL, OfficialFile, check_official_copy, load_golden, recorded_sources,
                           sha256_of)


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_golden_file_records_the_generators_official_sources(name):
    golden = load_golden(name)
    arch = ALL_CONFIGS[name]["arch"]
    recorded = {key: golden[key] for key in ("official_sources", "official_source_sha256")}
    assert recorded == recorded_sources(arch)
    assert list(golden["official_sources"]) == list(OFFICIAL[arch].sources)


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_official_sources_are_full_commits_and_hashes(arch):
    for source in OFFICIAL[arch].sources.values():
        assert re.fullmatch(r"[0-9a-f]{40}", source.commit), source
        assert re.fullmatch(r"[0-9a-f]{64}", source.sha256), source


def test_generator_refuses_a_copy_that_is_not_the_recorded_file(tmp_path):
    content = b"class RANet:\n    pass\n"
    copy = tmp_path / "RANet.py"
    copy.write_bytes(content)
    recorded = OfficialFile("0" * 40, hashlib.sha256(content).hexdigest())
    assert sha256_of(str(copy)) == recorded.sha256
    check_official_copy(str(copy), "owner/repo", "models/RANet.py", recorded)

    copy.write_bytes(content + b"# edited\n")
    with pytest.raises(ValueError, match=r"RANet\.py has sha256 [0-9a-f]{64}, but models/RANet\.py of owner/repo "
                                         r"at commit 0{40} has " + recorded.sha256):
        check_official_copy(str(copy), "owner/repo", "models/RANet.py", recorded)
    with pytest.raises(FileNotFoundError, match=r"copy models/RANet\.py of owner/repo"):
        check_official_copy(str(tmp_path / "missing.py"), "owner/repo", "models/RANet.py", recorded)
