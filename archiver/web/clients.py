"""Who a request's client is: its TCP peer, or the address a trusted proxy forwards for (X-Forwarded-For).

The client's address is what the log names; the limits (``limits.JobSlots``,
``walk_turns.ClientWalks``) count it as ``counted_client`` says: an IPv6
address by its network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable


def unmapped(address: str) -> str:
    """An IPv4 address as a dual-stack socket gives it (``::ffff:127.0.0.1``) in its own form; any other as it is.

    Bound to ``::`` (``-H ::``), the service sees IPv4 peers so: nginx on
    127.0.0.1 must still be the trusted proxy (helper 44: its clients were one
    client, and its X-Client-Protocol was ignored), and a client one client
    whichever way it came.
    """
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return address if mapped is None else str(mapped)


# IPv6 addresses that carry an IPv4 client's address in their last 32 bits: a NAT64 or SIIT
# translator's (RFC 6052's well-known prefix; RFC 7915's IPv4-translated form).  Cut to a /64,
# every IPv4 client behind the translator was one client (helper 136).
_TRANSLATED = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"))
# Counted by address: the IPv4-compatible form and loopback (::/96), and link-local addresses,
# which every host of a LAN has in one fe80::/64 (Hypercorn gives no zone to tell links apart).
_BY_ADDRESS = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("fe80::/10"))


def counted_client(address: str, ipv6_prefix: int) -> str:
    """Who the limits count ``address`` as: an IPv4 address (or "unknown") itself, an IPv6 address its network.

    ``ipv6_prefix``: the network's length in bits, 1..128 (``Settings.client_ipv6_prefix``,
    64 by default; 128: each address its own client).  An IPv6 subscriber is
    given a /64 at least (RFC 6177; a /56 or /48 by many providers), in which
    it may use any of 2**64 addresses: counted by address, one home reading
    16 slow downloads from 16 of its addresses held every job slot for hours.
    Counted by /64 it is one client, as an IPv4 home behind its router is.
    An address that embeds an IPv4 client's (NAT64, SIIT, 6to4, Teredo: RFC
    6052, 7915, 3056, 4380) is counted as that IPv4 address; link-local and
    ``::/96`` ones by address.  ``address`` is in ``TrustedProxies.client_address``'s
    spelling.
    """
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if any(ip in network for network in _TRANSLATED):
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:  # 2002:a.b.c.d::/48, a site's prefix made of its IPv4 address
        return str(ip.sixtofour)
    if ip.teredo is not None:  # (server, client): the client's public IPv4 address
        return str(ip.teredo[1])
    if ipv6_prefix >= 128 or any(ip in network for network in _BY_ADDRESS):
        return address
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


class TrustedProxies:
    """The proxies whose X-Forwarded-For is believed, and how to find the client behind them."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(address.strip(), strict=False) for address in addresses)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(unmapped(address))
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address: the peer, unless a trusted proxy names the one it forwards for.

        X-Forwarded-For is a list each proxy appends its own peer to, so only
        its right end can be believed: walk it from the right past trusted
        proxies (as nginx's realip module does with ``real_ip_recursive``).
        The first address not trusted is the client; anything to its left
        the client wrote itself.  A hop that is no address ends the walk: the
        client is then the last trusted one (a name or a quote in the logs
        and in the fair share's keys would be the client's own text; helper 52).
        """
        address = unmapped(peer) if peer else "unknown"
        if not forwarded_for or not self.trusts(address):
            return address
        for entry in reversed(forwarded_for.split(",")):
            if not entry.strip():
                continue
            hop = _hop_address(entry.strip())
            if hop is None:
                break
            address = hop
            if not self.trusts(hop):
                break
        return address


# Load balancers that write a port with the address (Azure's Application Gateway: "a.b.c.d:port",
# "[v6]:port"); nginx writes the address alone.
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?")
_IPV4_AND_PORT = re.compile(r"([0-9.]+):[0-9]{1,5}")


def _hop_address(entry: str) -> str | None:
    """The address in one X-Forwarded-For entry, in one spelling (no port, no zone, IPv4 unmapped); None if none.

    A zone ("fe80::1%eth0") is dropped: ``ip_address`` takes any text after the
    "%", which brought the client's own text back (helper 53); and one address
    is one client however it is written ("2001:DB8:0:0::1" is "2001:db8::1").
    """
    if match := _BRACKETED.fullmatch(entry) or _IPV4_AND_PORT.fullmatch(entry):
        entry = match.group(1)
    try:
        address = ipaddress.ip_address(entry.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
