"""RFC 6125 hostname matching: does a certificate's name list cover the name a client checks?

Owns the matching rules (SAN before CN, IP names against IP SANs only, one leftmost
wildcard label, IDNA comparison). Pure: it must not fetch, parse or judge certificates
(`certmon.pki` builds the `CertFacts` it reads; `certmon.scanverdict` turns a mismatch
into a finding).
"""

from __future__ import annotations

import ipaddress

from .pki import CertFacts

__all__ = ["match_hostname"]


def match_hostname(facts: CertFacts, name: str) -> str:
    """"san", "cn" (no SAN at all; legacy CN fallback) or "mismatch". RFC 6125 rules:
    IP names match only IP SANs; one leftmost `*` label, never over a public-suffix-ish
    single label (`*.com`), as OpenSSL's X509_check_host does."""
    ip = _ip(name)
    dns = [s[4:] for s in facts.sans if s.startswith("DNS:")]
    ips = [_ip(s[3:]) for s in facts.sans if s.startswith("IP:")]
    if dns or ips:
        if ip is not None:
            return "san" if ip in ips else "mismatch"
        return "san" if any(_dns_match(p, name) for p in dns) else "mismatch"
    cn = facts.common_name
    if cn and ip is None and _dns_match(cn, name):
        return "cn"
    return "mismatch"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = _norm(pattern), _norm(name)
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        suffix = pattern[2:]
        head, _, rest = name.partition(".")
        return bool(head) and rest == suffix and "." in suffix and "*" not in suffix
    return "*" not in pattern and pattern == name


def _norm(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return name
