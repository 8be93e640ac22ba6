package clients

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FakeHelper is a docker-credential-<Suffix> shell script that records every
// invocation (verb and stdin) and answers `get` with fixed credentials for
// whatever server URL it was asked about.
type FakeHelper struct {
	Dir    string // put on PATH with WithHelperDir(h.Dir)
	Suffix string // credHelpers value, e.g. "fake"
	Path   string // the script
	log    string
}

// HelperCall is one recorded invocation of a FakeHelper.
type HelperCall struct {
	Verb  string // get, store, erase, list, version
	Input string // stdin, trimmed: the server URL for get/erase
}

// NewFakeHelper writes docker-credential-<suffix> into a new temporary
// directory. `get` prints {"ServerURL":<stdin>,"Username":username,
// "Secret":secret}; `list` prints {}; store/erase succeed silently.
// username and secret must not contain `"`, `\` or `'`.
func NewFakeHelper(t testing.TB, suffix, username, secret string) *FakeHelper {
	t.Helper()
	for _, s := range []string{username, secret} {
		if strings.ContainsAny(s, "\"\\'\n") {
			t.Fatalf("clients: fake helper credentials must not contain quotes, backslashes or newlines")
		}
	}
	dir := t.TempDir()
	h := &FakeHelper{
		Dir:    dir,
		Suffix: suffix,
		Path:   filepath.Join(dir, "docker-credential-"+suffix),
		log:    filepath.Join(dir, "calls.log"),
	}
	script := `#!/bin/sh
# fake docker credential helper written by internal/clients
verb="$1"
input="$(cat)"
# one record per call: verb, a tab, stdin with newlines turned to spaces
printf '%s\t%s\n' "$verb" "$(printf '%s' "$input" | tr '\n' ' ')" >> '` + h.log + `'
case "$verb" in
get)
	printf '{"ServerURL":"%s","Username":"` + username + `","Secret":"` + secret + `"}\n' "$input"
	;;
list)
	printf '{}\n'
	;;
store|erase)
	;;
version)
	printf 'fake 0.0.0\n'
	;;
*)
	printf 'unknown verb %s\n' "$verb"
	exit 1
	;;
esac
`
	mustWrite(t, h.Path, script)
	if err := os.Chmod(h.Path, 0o755); err != nil {
		t.Fatalf("clients: %v", err)
	}
	return h
}

// Calls returns the invocations so far, in order.
func (h *FakeHelper) Calls() []HelperCall {
	b, err := os.ReadFile(h.log)
	if err != nil {
		return nil
	}
	var out []HelperCall
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if line == "" {
			continue
		}
		verb, input, _ := strings.Cut(line, "\t")
		out = append(out, HelperCall{Verb: verb, Input: strings.TrimSpace(input)})
	}
	return out
}

// Gets returns the server URLs of the `get` calls so far, in order.
func (h *FakeHelper) Gets() []string {
	var out []string
	for _, c := range h.Calls() {
		if c.Verb == "get" {
			out = append(out, c.Input)
		}
	}
	return out
}

// Reset forgets the recorded calls.
func (h *FakeHelper) Reset() { _ = os.Remove(h.log) }
