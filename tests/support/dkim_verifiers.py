"""OpenDKIM and Mail::DKIM as verifiers: each reads message files and the TXT records from a
dict instead of DNS, and says per file whether the DKIM signature verifies.

tests/ensure-peers installs both (Debian's opendkim and libmail-dkim-perl). Mail::DKIM of
Debian 12 knows no ed25519-sha256 (it answers "invalid (unsupported algorithm ...)").
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Mail::DKIM::Verifier per file; its DNS query is replaced by a look-up in the keys file.
_MAIL_DKIM = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS;
my %txt;
open(my $keys, '<', shift @ARGV) or die "keys: $!";
while (<$keys>) { chomp; my ($name, $value) = split / /, $_, 2; $txt{lc $name} = $value; }
no warnings 'redefine';
*Mail::DKIM::DNS::query = sub {
    my ($name, $type) = @_;
    my $value = $txt{lc $name} // return ();
    return (Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => [unpack('(A255)*', $value)]));
};
for my $file (@ARGV) {
    my $dkim = Mail::DKIM::Verifier->new();
    open(my $fh, '<:raw', $file) or die "$file: $!";
    local $/;
    $dkim->PRINT(<$fh>);
    $dkim->CLOSE();
    print "$file\t", $dkim->result_detail, "\n";
}
"""


def _keys_file(folder: Path, records: dict[str, str]) -> Path:
    path = folder / "dkim-keys.txt"
    path.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
    return path


def opendkim(files: list[Path], records: dict[str, str]) -> dict[Path, str]:
    """`opendkim -t` per file (its test mode, keys from TestPublicKeys): "pass" or its complaint."""
    binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
    assert Path(binary).exists(), "opendkim is installed by tests/ensure-peers"
    folder = files[0].parent
    config = folder / "opendkim.conf"
    config.write_text(f"Mode v\nSyslog no\nTestPublicKeys {_keys_file(folder, records)}\n")
    results = {}
    for path in files:
        done = subprocess.run([binary, "-x", str(config), "-t", str(path)], capture_output=True, text=True, timeout=30)
        said = done.stdout + done.stderr
        results[path] = "pass" if done.returncode == 0 and "succeeded" in said else said.strip()
    return results


def mail_dkim(files: list[Path], records: dict[str, str]) -> dict[Path, str]:
    """Mail::DKIM::Verifier over every file in one perl: "pass" or its result detail."""
    folder = files[0].parent
    done = subprocess.run(["perl", "-e", _MAIL_DKIM, str(_keys_file(folder, records)), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"Mail::DKIM (tests/ensure-peers installs libmail-dkim-perl): {done.stderr}"
    results = {}
    for line in done.stdout.splitlines():
        name, _, detail = line.partition("\t")
        results[Path(name)] = detail
    return results
