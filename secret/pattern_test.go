package secret

import (
	"strings"
	"testing"

	"github.com/distribution/reference"
)

func TestParseServerURL(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in, host, repo string
	}{
		{"127.0.0.1:5000", "127.0.0.1:5000", ""},
		{" 127.0.0.1:5000\n", "127.0.0.1:5000", ""},
		{"http://127.0.0.1:5000", "127.0.0.1:5000", ""},
		{"https://127.0.0.1:5000/", "127.0.0.1:5000", ""},
		{"127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app"},
		{"https://index.docker.io/v1/", DockerHub, ""},
		{"index.docker.io", DockerHub, ""},
		{"docker.io", DockerHub, ""},
		{"registry-1.docker.io", DockerHub, ""},
		{"https://registry-1.docker.io:443/v2/", DockerHub, ""},
		{"index.docker.io/library/alpine", DockerHub, "library/alpine"},
		{"GHCR.IO/acme/agent", "ghcr.io", "acme/agent"},
		{"https://ghcr.io:443", "ghcr.io", ""},
		{"http://reg.example:80/v2/", "reg.example", ""},
		{"https://reg.example:80", "reg.example:80", ""},
		{"reg.example/v2/team/app", "reg.example", "team/app"},
		{"localhost:5000", "localhost:5000", ""},
		{"[::1]:5000", "[::1]:5000", ""},
		{"https://[::1]:443/x", "[::1]", "x"},
		{"123456789012.dkr.ecr.us-east-1.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com", ""},
		{"reg.example/team/app?ns=x", "reg.example", "team/app"},
	} {
		got, err := ParseServerURL(tc.in)
		if err != nil {
			t.Errorf("ParseServerURL(%q): %v", tc.in, err)
			continue
		}
		if got.Host != tc.host || got.Repo != tc.repo {
			t.Errorf("ParseServerURL(%q) = %q %q, want %q %q", tc.in, got.Host, got.Repo, tc.host, tc.repo)
		}
	}
}

func TestParseServerURLErrors(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		"", "   ", "ftp://reg.example", "https://", "user:canary-pw@reg.example",
		"https://user:canary-pw@reg.example/v1/", "reg example", "reg.example:",
		"-bad.example", "reg.example/UPPER/case", "reg.example/a/../b", "reg..example",
		"reg.example/a//b", "a\x00b", "reg.example:99999",
	} {
		_, err := ParseServerURL(in)
		if err == nil {
			t.Errorf("ParseServerURL(%q): no error", in)
			continue
		}
		if strings.Contains(err.Error(), "canary-pw") {
			t.Errorf("ParseServerURL(%q): error leaks user info: %v", in, err)
		}
	}
}

func TestPatternMatch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pattern, target string
		want            bool
	}{
		{"reg.io", "reg.io", true},
		{"reg.io", "reg.io/anything/below", true},
		{"reg.io/team", "reg.io/team", true},
		{"reg.io/team", "reg.io/team/app", true},
		{"reg.io/team", "reg.io/teamb", false},
		{"reg.io/team", "reg.io/teamb/app", false},
		{"reg.io/team", "reg.io", false},
		{"reg.io", "reg.io:5000", false},
		{"reg.io:5000", "reg.io:5000/x", true},
		{"reg.io", "other.io", false},
		{"docker.io", "https://index.docker.io/v1/", true},
		{"docker.io/acme", "index.docker.io/acme/app", true},
	} {
		p, err := ParsePattern(tc.pattern)
		if err != nil {
			t.Fatal(err)
		}
		target, err := ParseServerURL(tc.target)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Match(target) > 0; got != tc.want {
			t.Errorf("%s matches %s = %v, want %v", tc.pattern, tc.target, got, tc.want)
		}
	}
}

func FuzzParseServerURL(f *testing.F) {
	for _, s := range []string{"127.0.0.1:5000", "https://index.docker.io/v1/", "reg.io/team/app", "[::1]:5000", "http://a:80/v2/x", "u:p@h"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseServerURL(s)
		if err != nil {
			return
		}
		// A canonical target parses to itself.
		again, err := ParseServerURL(got.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", got, s, err)
		}
		if again != got {
			t.Fatalf("not idempotent: %q -> %q -> %q", s, got, again)
		}
		if strings.Contains(got.Host, "/") || strings.ContainsAny(got.String(), " \t\n@") {
			t.Fatalf("bad canonical form %q from %q", got, s)
		}
	})
}

func FuzzPatternMatch(f *testing.F) {
	f.Add("reg.io/team", "reg.io/team/app")
	f.Add("reg.io/team", "reg.io/teamb")
	f.Add("docker.io", "index.docker.io/library/x")
	f.Fuzz(func(t *testing.T, pattern, target string) {
		p, err := ParsePattern(pattern)
		if err != nil {
			return
		}
		tg, err := ParseServerURL(target)
		if err != nil {
			return
		}
		if p.Match(tg) == 0 {
			return
		}
		// A match always means same host and a prefix that ends on a
		// path-segment boundary.
		if p.Host() != tg.Host {
			t.Fatalf("%s matched %s on another host", p, tg)
		}
		if pre := p.Prefix(); pre != "" && tg.Repo != pre && !strings.HasPrefix(tg.Repo, pre+"/") {
			t.Fatalf("%s matched %s across a segment boundary", p, tg)
		}
	})
}

// TestValidRepoGrammar checks the hand-written grammar against the
// reference implementation of distribution.
func TestValidRepoGrammar(t *testing.T) {
	t.Parallel()
	for _, p := range []string{
		"a", "a/b", "a-b", "a--b", "a_b", "a__b", "a___b", "a.b", "a..b", "a._b", "-a", "a-", ".a", "a/",
		"/a", "a//b", "A", "a/B", "a b", "0", "a.b-c_d__e/f", "a/../b", "a/./b", "é", "a-_b",
	} {
		full := "example.com/" + p
		want := reference.NameRegexp.FindString(full) == full
		if got := validRepo(p) == nil; got != want {
			t.Errorf("validRepo(%q) = %v, distribution says %v", p, got, want)
		}
	}
}

func FuzzValidRepo(f *testing.F) {
	f.Add("a.b-c_d__e/f")
	f.Fuzz(func(t *testing.T, p string) {
		if len(p) > 255 {
			return
		}
		full := "example.com/" + p
		want := reference.NameRegexp.FindString(full) == full
		if got := validRepo(p) == nil; got != want {
			t.Fatalf("validRepo(%q) = %v, distribution says %v", p, got, want)
		}
	})
}
