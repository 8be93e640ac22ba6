// Package netguard keeps outbound connections away from addresses a
// server-side fetcher must not reach on a client's behalf: loopback,
// private, link-local, carrier-grade NAT, reserved and cloud-metadata
// addresses.
//
// The check runs in net.Dialer.Control, that is on the address actually
// being connected to, after DNS resolution: a name that resolves to
// 169.254.169.254 (or is re-bound to it between two lookups) is refused just
// like the literal address.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"
)

// Policy says which otherwise refused addresses may be dialled. The zero
// Policy refuses them all.
type Policy struct {
	// AllowPrivate allows every refused range except the cloud metadata
	// endpoints, which only an explicit prefix in Prefixes allows.
	AllowPrivate bool
	// Prefixes are address ranges that may be dialled, e.g. 127.0.0.1/32 or
	// 10.0.0.0/8 (a single address is a /32 or /128).
	Prefixes []netip.Prefix
	// Hosts are host names (lower case, without port) whose addresses may
	// be private, e.g. "registry.internal". Metadata addresses stay refused.
	Hosts []string
}

// ParseEntry adds one allow-list entry to the policy: a CIDR prefix, an IP
// address or a host name.
func (p *Policy) ParseEntry(s string) error {
	s = strings.TrimSpace(s)
	if s == "" {
		return errors.New("empty entry")
	}
	if pre, err := netip.ParsePrefix(s); err == nil {
		p.Prefixes = append(p.Prefixes, pre.Masked())
		return nil
	}
	if a, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		if a.Zone() != "" {
			return fmt.Errorf("%q: zoned addresses are not supported", s)
		}
		a = a.Unmap()
		p.Prefixes = append(p.Prefixes, netip.PrefixFrom(a, a.BitLen()))
		return nil
	}
	h := strings.ToLower(s)
	if !validHostname(h) {
		return fmt.Errorf("%q is neither a CIDR prefix, an IP address nor a host name", s)
	}
	p.Hosts = append(p.Hosts, h)
	return nil
}

// Describe summarises the policy for a log line.
func (p Policy) Describe() string {
	var parts []string
	if p.AllowPrivate {
		parts = append(parts, "all private addresses (not metadata)")
	}
	for _, pre := range p.Prefixes {
		parts = append(parts, pre.String())
	}
	parts = append(parts, p.Hosts...)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

// BlockedError is returned (wrapped in a *net.OpError) when a dial is
// refused.
type BlockedError struct {
	Host string     // the host name or address that was dialled
	Addr netip.Addr // the address it resolved to
	// Reason names the range: "loopback", "private", "link-local",
	// "cloud metadata", ...
	Reason string
}

func (e *BlockedError) Error() string {
	if e.Host != "" && e.Host != e.Addr.String() {
		return fmt.Sprintf("refusing to connect to %s: it resolves to %s, a %s address", e.Host, e.Addr, e.Reason)
	}
	return fmt.Sprintf("refusing to connect to %s: a %s address", e.Addr, e.Reason)
}

// metadata are cloud instance-metadata endpoints: never allowed by
// AllowPrivate or a host entry, only by an explicit prefix.
var metadata = []netip.Prefix{
	netip.MustParsePrefix("169.254.169.254/32"), // AWS, GCP, Azure, OpenStack, ...
	netip.MustParsePrefix("169.254.170.2/32"),   // AWS ECS task metadata
	netip.MustParsePrefix("169.254.169.123/32"), // AWS time sync
	netip.MustParsePrefix("100.100.100.200/32"), // Alibaba Cloud
	netip.MustParsePrefix("fd00:ec2::254/128"),  // AWS IMDS over IPv6
	netip.MustParsePrefix("fd00:ec2::23/128"),   // AWS DNS over IPv6
}

type blockedRange struct {
	p      netip.Prefix
	reason string
}

var blocked = func() []blockedRange {
	var out []blockedRange
	add := func(reason string, ps ...string) {
		for _, p := range ps {
			out = append(out, blockedRange{netip.MustParsePrefix(p), reason})
		}
	}
	add("unspecified", "0.0.0.0/8", "::/128")
	add("loopback", "127.0.0.0/8", "::1/128")
	add("private", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
	add("link-local", "169.254.0.0/16", "fe80::/10")
	add("carrier-grade NAT", "100.64.0.0/10")
	add("reserved", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
		"203.0.113.0/24", "240.0.0.0/4", "2001:db8::/32", "100::/64")
	add("multicast", "224.0.0.0/4", "ff00::/8")
	add("site-local", "fec0::/10")
	return out
}()

// nat64 is the well-known NAT64 prefix; an address in it embeds an IPv4
// address that is checked too.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// Check reports why addr (reached as host) may not be dialled under p, or
// nil if it may.
func (p *Policy) Check(host string, addr netip.Addr) error {
	addr = addr.Unmap()
	if nat64.Contains(addr) {
		b := addr.As16()
		v4 := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
		if err := p.Check(host, v4); err != nil {
			return err
		}
	}
	if addr.Is6() && addr.Zone() != "" {
		addr = addr.WithZone("")
	}
	for _, pre := range p.Prefixes {
		if pre.Contains(addr) {
			return nil
		}
	}
	for _, m := range metadata {
		if m.Contains(addr) {
			return &BlockedError{Host: host, Addr: addr, Reason: "cloud metadata"}
		}
	}
	reason := ""
	for _, b := range blocked {
		if b.p.Contains(addr) {
			reason = b.reason
			break
		}
	}
	if reason == "" {
		return nil
	}
	if p.AllowPrivate {
		return nil
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	for _, allowed := range p.Hosts {
		if h == allowed {
			return nil
		}
	}
	return &BlockedError{Host: host, Addr: addr, Reason: reason}
}

// Dialer dials TCP connections under a Policy.
type Dialer struct {
	Policy    Policy
	Timeout   time.Duration
	KeepAlive time.Duration
	// Resolver, if set, is used for lookups (tests point names at chosen
	// addresses with it).
	Resolver *net.Resolver
}

// DialContext is for http.Transport.DialContext.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	nd := net.Dialer{
		Timeout:   d.Timeout,
		KeepAlive: d.KeepAlive,
		Resolver:  d.Resolver,
		Control: func(_, addr string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return fmt.Errorf("refusing to connect to %s: unparsable address", addr)
			}
			return d.Policy.Check(host, ap.Addr())
		},
	}
	return nd.DialContext(ctx, network, address)
}

// IsBlocked reports whether err comes from a refused dial, and returns the
// refusal.
func IsBlocked(err error) (*BlockedError, bool) {
	var b *BlockedError
	if errors.As(err, &b) {
		return b, true
	}
	return nil, false
}
