package netguard

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestCheck(t *testing.T) {
	t.Parallel()
	var none Policy
	all := Policy{AllowPrivate: true}
	var lo Policy
	if err := lo.ParseEntry("127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	var meta Policy
	if err := meta.ParseEntry("169.254.169.254/32"); err != nil {
		t.Fatal(err)
	}
	var named Policy
	if err := named.ParseEntry("Registry.Internal"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		p      Policy
		host   string
		addr   string
		reason string // "" = allowed
	}{
		{none, "x", "8.8.8.8", ""},
		{none, "x", "2606:4700::1111", ""},
		{none, "x", "127.0.0.1", "loopback"},
		{none, "x", "::1", "loopback"},
		{none, "x", "::ffff:127.0.0.1", "loopback"},
		{none, "x", "10.0.0.1", "private"},
		{none, "x", "172.20.1.1", "private"},
		{none, "x", "192.168.1.1", "private"},
		{none, "x", "fd12::1", "private"},
		{none, "x", "169.254.10.10", "link-local"},
		{none, "x", "fe80::1", "link-local"},
		{none, "x", "169.254.169.254", "cloud metadata"},
		{none, "x", "fd00:ec2::254", "cloud metadata"},
		{none, "x", "100.100.100.200", "cloud metadata"},
		{none, "x", "64:ff9b::a9fe:a9fe", "cloud metadata"}, // NAT64 of 169.254.169.254
		{none, "x", "100.64.0.1", "carrier-grade NAT"},
		{none, "x", "0.0.0.0", "unspecified"},
		{none, "x", "224.0.0.1", "multicast"},
		{all, "x", "10.0.0.1", ""},
		{all, "x", "127.0.0.1", ""},
		{all, "x", "169.254.169.254", "cloud metadata"},
		{lo, "x", "127.0.0.1", ""},
		{lo, "x", "127.0.0.2", "loopback"},
		{meta, "x", "169.254.169.254", ""},
		{named, "registry.internal", "10.1.2.3", ""},
		{named, "other.internal", "10.1.2.3", "private"},
		{named, "registry.internal", "169.254.169.254", "cloud metadata"},
	} {
		err := tc.p.Check(tc.host, netip.MustParseAddr(tc.addr))
		switch {
		case tc.reason == "" && err != nil:
			t.Errorf("%s (%s): refused: %v", tc.addr, tc.p.Describe(), err)
		case tc.reason != "" && (err == nil || !strings.Contains(err.Error(), tc.reason)):
			t.Errorf("%s (%s): %v, want %q", tc.addr, tc.p.Describe(), err, tc.reason)
		}
	}
	var p Policy
	for _, bad := range []string{"", "not a host!", "fe80::1%eth0"} {
		if p.ParseEntry(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestDialerChecksResolvedAddress: the check runs on the address actually
// dialled, so a name resolving to loopback is refused like the literal.
func TestDialerChecksResolvedAddress(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := &Dialer{Timeout: time.Second}
	for _, host := range []string{"127.0.0.1", "localhost"} {
		_, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, port))
		b, ok := IsBlocked(err)
		if !ok || b.Reason != "loopback" {
			t.Errorf("%s: %v", host, err)
		}
	}
	d.Policy.ParseEntry("127.0.0.1")
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		t.Fatalf("allowed dial: %v", err)
	}
	c.Close()
}
