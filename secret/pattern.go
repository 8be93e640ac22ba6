package secret

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DockerHub is the canonical host for Docker Hub; every alias a client may
// send is rewritten to it.
const DockerHub = "docker.io"

var dockerHubAliases = map[string]bool{
	"docker.io":                true,
	"index.docker.io":          true,
	"registry-1.docker.io":     true,
	"registry.hub.docker.com":  true,
	"registry-1.docker.io:443": true,
	"index.docker.io:443":      true,
	"docker.io:443":            true,
}

// Target is a registry host and, where the caller knows it, a repository
// on it.
type Target struct {
	Host string // canonical host[:port], lower case
	Repo string // repository path, "" when unknown
}

func (t Target) String() string {
	if t.Repo == "" {
		return t.Host
	}
	return t.Host + "/" + t.Repo
}

// ParseServerURL normalises every form of server URL that credential-helper
// callers send: "host", "host:port", "https://host/v1/", "host/repo",
// "docker.io", "https://index.docker.io/v1/", and so on.
//
// Errors never echo user info embedded in the URL.
func ParseServerURL(s string) (Target, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Target{}, fmt.Errorf("empty server URL")
	}
	for _, r := range s {
		if r < 0x21 || r == 0x7f {
			return Target{}, fmt.Errorf("server URL contains a space or control character")
		}
	}
	scheme := ""
	if i := strings.Index(s, "://"); i >= 0 {
		scheme = strings.ToLower(s[:i])
		if scheme != "http" && scheme != "https" {
			return Target{}, fmt.Errorf("server URL scheme %q: want http or https", scheme)
		}
		s = s[i+3:]
	}
	host, path, _ := strings.Cut(s, "/")
	if i := strings.LastIndex(host, "@"); i >= 0 {
		return Target{}, fmt.Errorf("server URL must not contain user info")
	}
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	host, err := canonicalHost(host, scheme)
	if err != nil {
		return Target{}, err
	}
	path = strings.Trim(path, "/")
	// Docker CLI sends https://index.docker.io/v1/ and some tools keep the
	// API version in the URL: it names the API, not a repository.
	if path == "v1" || path == "v2" {
		path = ""
	} else if strings.HasPrefix(path, "v2/") {
		path = strings.TrimPrefix(path, "v2/")
	}
	if path != "" {
		if err := validRepo(path); err != nil {
			return Target{}, err
		}
	}
	return Target{Host: host, Repo: path}, nil
}

// canonicalHost lower-cases a host, drops a port that the scheme implies and
// folds the Docker Hub aliases into one.
func canonicalHost(host, scheme string) (string, error) {
	if host == "" {
		return "", fmt.Errorf("server URL has no host")
	}
	host = strings.ToLower(host)
	h, port, err := splitHostPort(host)
	if err != nil {
		return "", err
	}
	if port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || port[0] == '0' {
			return "", fmt.Errorf("registry host %q: invalid port", host)
		}
		if (scheme == "https" && port == "443") || (scheme == "http" && port == "80") {
			port = ""
		}
	}
	if strings.HasPrefix(h, "[") {
		a, err := netip.ParseAddr(h[1 : len(h)-1])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return "", fmt.Errorf("invalid registry host %q", host)
		}
	} else if _, err := netip.ParseAddr(h); err != nil && !validHostname(h) {
		return "", fmt.Errorf("invalid registry host %q", host)
	}
	host = h
	if port != "" {
		host += ":" + port
	}
	if dockerHubAliases[host] {
		return DockerHub, nil
	}
	return host, nil
}

// splitHostPort splits "host", "host:port", "[v6]" and "[v6]:port"; an IPv6
// address keeps its brackets.
func splitHostPort(s string) (host, port string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", "", fmt.Errorf("invalid registry host %q", s)
		}
		host, rest := s[:end+1], s[end+1:]
		if rest == "" {
			return host, "", nil
		}
		if rest[0] != ':' || len(rest) == 1 {
			return "", "", fmt.Errorf("invalid registry host %q", s)
		}
		return host, rest[1:], nil
	}
	host, port, found := strings.Cut(s, ":")
	if found && (port == "" || strings.Contains(port, ":")) {
		return "", "", fmt.Errorf("invalid registry host %q", s)
	}
	return host, port, nil
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

// validRepo checks a repository path against the distribution grammar:
// components of [a-z0-9]+ joined by ".", "_", "__" or runs of "-",
// separated by "/". It is written out rather than taken from
// distribution/reference because that package's regexps cost the helper
// process most of a millisecond to compile at start-up.
func validRepo(path string) error {
	if len(path) > 255 {
		return fmt.Errorf("invalid repository path: longer than 255 characters")
	}
	for _, c := range strings.Split(path, "/") {
		if !ValidComponent(c) {
			return fmt.Errorf("invalid repository path %q", path)
		}
	}
	return nil
}

// ValidComponent reports whether c is one component of a repository name
// in the distribution grammar.
func ValidComponent(c string) bool {
	alnum := func(b byte) bool { return b >= 'a' && b <= 'z' || b >= '0' && b <= '9' }
	if c == "" || !alnum(c[0]) || !alnum(c[len(c)-1]) {
		return false
	}
	for i := 0; i < len(c); {
		if alnum(c[i]) {
			i++
			continue
		}
		// A separator: ".", "_", "__" or one or more "-".
		j := i
		switch c[i] {
		case '.':
			j++
		case '_':
			j++
			if j < len(c) && c[j] == '_' {
				j++
			}
		case '-':
			for j < len(c) && c[j] == '-' {
				j++
			}
		default:
			return false
		}
		if j >= len(c) || !alnum(c[j]) {
			return false
		}
		i = j
	}
	return true
}

// Pattern is a registry pattern, "host[:port][/path-prefix]", in canonical
// form. A pattern with a prefix covers that repository and those below it:
// "reg.io/team" covers "reg.io/team" and "reg.io/team/app" but not
// "reg.io/teamb".
type Pattern string

// ParsePattern validates and canonicalises a registry pattern. It accepts
// the same spellings as ParseServerURL.
func ParsePattern(s string) (Pattern, error) {
	t, err := ParseServerURL(s)
	if err != nil {
		return "", fmt.Errorf("registry pattern: %w", err)
	}
	return Pattern(t.String()), nil
}

// Host is the pattern's registry host.
func (p Pattern) Host() string {
	h, _, _ := strings.Cut(string(p), "/")
	return h
}

// Prefix is the pattern's repository prefix, "" for the whole registry.
func (p Pattern) Prefix() string {
	_, pre, _ := strings.Cut(string(p), "/")
	return pre
}

// Match reports whether p covers t, and how specific the match is (the
// prefix length plus one; 0 for no match) so that the longest match wins.
func (p Pattern) Match(t Target) int {
	if p.Host() != t.Host {
		return 0
	}
	pre := p.Prefix()
	if pre == "" {
		return 1
	}
	if t.Repo == pre || strings.HasPrefix(t.Repo, pre+"/") {
		return len(pre) + 1
	}
	return 0
}
