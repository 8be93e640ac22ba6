package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

// canary is the secret value every test stores: it must never show up in
// any output, nor in clear in any file.
const canary = "canary-pw-3f9a1c"

// env is one isolated data folder and environment for running the CLI
// in-process. It records everything the CLI printed and, when the test
// ends, checks that the canary appears in none of it and in no file of the
// home folder.
type env struct {
	t    *testing.T
	home string
	vars map[string]string

	mu      sync.Mutex
	outputs []string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, home: filepath.Join(t.TempDir(), "home"), vars: map[string]string{}}
	t.Cleanup(func() { e.checkNoCanary() })
	return e
}

func (e *env) getenv(k string) string {
	if k == "PULLSECRET_HOME" {
		return e.home
	}
	return e.vars[k]
}

type result struct {
	code           int
	stdout, stderr string
}

// run runs the CLI with stdin and args.
func (e *env) run(stdin string, args ...string) result {
	e.t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(stdin), &out, &errb, e.getenv)
	r := result{code: code, stdout: out.String(), stderr: errb.String()}
	e.mu.Lock()
	e.outputs = append(e.outputs, r.stdout, r.stderr)
	e.mu.Unlock()
	if strings.Contains(r.stderr, "internal error") || strings.Contains(r.stderr, "panic") {
		e.t.Errorf("pullsecret %q panicked: %s", args, r.stderr)
	}
	if code == 0 && r.stderr != "" && !strings.Contains(r.stderr, "note:") {
		e.t.Errorf("pullsecret %q: exit 0 with stderr %q", args, r.stderr)
	}
	if code != 0 && !strings.HasPrefix(r.stderr, "pullsecret: ") {
		e.t.Errorf("pullsecret %q: exit %d, stderr not prefixed: %q", args, code, r.stderr)
	}
	return r
}

// must runs the CLI and fails the test unless it exits 0.
func (e *env) must(stdin string, args ...string) string {
	e.t.Helper()
	r := e.run(stdin, args...)
	if r.code != 0 {
		e.t.Fatalf("pullsecret %q: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

func (e *env) store() *secret.Store {
	e.t.Helper()
	s, err := secret.Open(e.home, secret.WithKeyFile(e.vars["PULLSECRET_KEY_FILE"]))
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// value resolves what the helper would hand a client for registry in project.
func (e *env) value(project, registry string) (secret.Secret, secret.Value) {
	e.t.Helper()
	tg, err := secret.ParseServerURL(registry)
	if err != nil {
		e.t.Fatal(err)
	}
	s, v, err := e.store().Match(context.Background(), project, tg)
	if err != nil {
		e.t.Fatalf("match %s in %s: %v", registry, project, err)
	}
	return s, v
}

// canaryForms are the spellings of the canary that must not leak: as is
// and inside the base64 "auth" field of Docker configs.
func canaryForms() []string {
	forms := []string{canary}
	for _, user := range []string{"acme-bot", "team-bot", "hubuser", "quayuser", "bot"} {
		forms = append(forms, base64.StdEncoding.EncodeToString([]byte(user+":"+canary)))
	}
	return forms
}

func (e *env) checkNoCanary() {
	e.t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, o := range e.outputs {
		for _, f := range canaryForms() {
			if strings.Contains(o, f) {
				e.t.Errorf("canary %q printed:\n%s", f, o)
			}
		}
	}
	checkHomeNoCanary(e.t, e.home)
	if kf := e.vars["PULLSECRET_KEY_FILE"]; kf != "" {
		checkFileNoCanary(e.t, kf)
	}
}

// checkHomeNoCanary greps every file of the home folder for the canary,
// the sealed store included (where it must not be in clear either).
func checkHomeNoCanary(t *testing.T, home string) {
	t.Helper()
	filepath.WalkDir(home, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		checkFileNoCanary(t, path)
		if rel, _ := filepath.Rel(home, path); strings.HasPrefix(rel, "cache"+string(filepath.Separator)) {
			// The cache's storage driver writes 0644 files; its folder
			// must be private instead.
			if st, err := os.Stat(filepath.Join(home, "cache")); err == nil && st.Mode().Perm()&0o077 != 0 {
				t.Errorf("%s: mode %v, want 0700", filepath.Join(home, "cache"), st.Mode().Perm())
			}
			return nil
		}
		if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: mode %v, want 0600", path, st.Mode().Perm())
		}
		return nil
	})
}

func checkFileNoCanary(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	for _, f := range canaryForms() {
		if bytes.Contains(b, []byte(f)) {
			t.Errorf("canary %q in clear in %s", f, path)
		}
	}
}

func TestHelpAndDispatch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // substring of stdout
		stderr     string // substring of stderr
		usageOnErr bool
	}{
		{args: nil, code: 2, stderr: "missing command"},
		{args: []string{"help"}, code: 0, stdout: "Usage: pullsecret [--home DIR] COMMAND"},
		{args: []string{"--help"}, code: 0, stdout: "Commands:"},
		{args: []string{"-h"}, code: 0, stdout: "secret"},
		{args: []string{"help", "secret"}, code: 0, stdout: "Usage: pullsecret secret COMMAND"},
		{args: []string{"help", "secret", "create"}, code: 0, stdout: "--password-stdin"},
		{args: []string{"help", "key", "rotate"}, code: 0, stdout: "Usage: pullsecret key rotate"},
		{args: []string{"secret", "help", "import"}, code: 0, stdout: "--from-dockerconfig"},
		{args: []string{"secret", "--help"}, code: 0, stdout: "import"},
		{args: []string{"secret", "-h"}, code: 0, stdout: "rotate"},
		{args: []string{"secret", "create", "--help"}, code: 0, stdout: "Usage: pullsecret secret create NAME"},
		{args: []string{"secret", "create", "-h"}, code: 0, stdout: "--token-stdin"},
		{args: []string{"secret", "create", "x", "--registry", "r.io", "--help"}, code: 0, stdout: "Usage: pullsecret secret create"},
		{args: []string{"secret", "import", "--help"}, code: 0, stdout: "Usage: pullsecret secret import"},
		{args: []string{"secret", "list", "--help"}, code: 0, stdout: "NAME"},
		{args: []string{"secret", "show", "--help"}, code: 0, stdout: "Neither the value nor the user name"},
		{args: []string{"secret", "rotate", "--help"}, code: 0, stdout: "Usage: pullsecret secret rotate"},
		{args: []string{"secret", "delete", "--help"}, code: 0, stdout: "Usage: pullsecret secret delete"},
		{args: []string{"key", "--help"}, code: 0, stdout: "rotate"},
		{args: []string{"key", "rotate", "--help"}, code: 0, stdout: "new key id"},
		{args: []string{"version", "--help"}, code: 0, stdout: "Usage: pullsecret version"},
		{args: []string{"version"}, code: 0, stdout: "pullsecret "},
		{args: []string{"--version"}, code: 0, stdout: "pullsecret "},
		{args: []string{"version", "extra"}, code: 2, stderr: "unexpected argument"},
		{args: []string{"bogus"}, code: 2, stderr: `unknown command "bogus"`},
		{args: []string{"help", "bogus"}, code: 2, stderr: "unknown command"},
		{args: []string{"--bogus"}, code: 2, stderr: "unknown flag --bogus"},
		{args: []string{"--home"}, code: 2, stderr: "flag --home needs a value"},
		{args: []string{"secret"}, code: 2, stderr: "missing command"},
		{args: []string{"secret", "bogus"}, code: 2, stderr: `unknown command "secret bogus"`},
		{args: []string{"secret", "--project", "p", "list"}, code: 2, stderr: "unknown flag --project (flags go after the command)"},
		{args: []string{"key"}, code: 2, stderr: "missing command"},
		{args: []string{"key", "rotate", "extra"}, code: 2, stderr: "unexpected argument"},
		{args: []string{"key", "rotate", "--project", "p"}, code: 2, stderr: "unknown flag --project"},
		// Weird input: never a panic, always a clear error.
		{args: []string{"\x00\x01\xff"}, code: 2, stderr: "unknown command"},
		{args: []string{"secret", "show", strings.Repeat("a", 10000)}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "show", "\x1b[31mred"}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "show", ""}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "show", "-"}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "show", "--", "--x"}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "show", "-o"}, code: 2, stderr: "flag --o needs a value"},
		{args: []string{"secret", "list", "---"}, code: 2, stderr: "bad flag syntax"},
		{args: []string{"secret", "list", "-o", "yaml"}, code: 2, stderr: `unknown output format "yaml"`},
		{args: []string{"secret", "create", "=", "--registry=", "--username=u", "--password-stdin"}, code: 1, stderr: "invalid name"},
		{args: []string{"secret", "create", "x", "--registry=r.io", "--username=", "--password-stdin"}, code: 2, stderr: "--username is required"},
		{args: []string{"secret", "create", "x", "--registry=", "--username=u", "--password-stdin"}, code: 1, stderr: "--registry"},
	} {
		e := newEnv(t)
		r := e.run("", tc.args...)
		if r.code != tc.code || !strings.Contains(r.stdout, tc.stdout) || !strings.Contains(r.stderr, tc.stderr) {
			t.Errorf("pullsecret %q: exit %d (want %d)\nstdout: %s\nstderr: %s\nwant stdout ~ %q, stderr ~ %q",
				tc.args, r.code, tc.code, r.stdout, r.stderr, tc.stdout, tc.stderr)
		}
		if tc.code == 2 && !strings.Contains(r.stderr, "Usage: pullsecret") {
			t.Errorf("pullsecret %q: usage error without usage:\n%s", tc.args, r.stderr)
		}
		if tc.code == 1 && strings.Contains(r.stderr, "Usage:") {
			t.Errorf("pullsecret %q: runtime error printed usage:\n%s", tc.args, r.stderr)
		}
		if tc.code == 0 && r.stderr != "" {
			t.Errorf("pullsecret %q: stderr %q", tc.args, r.stderr)
		}
	}
}

func TestCommandsRegistered(t *testing.T) {
	t.Parallel()
	for name, cmd := range commands() {
		if cmd.summary == "" {
			t.Errorf("%s: no summary", name)
		}
		if (cmd.run == nil) == (cmd.sub == nil) {
			t.Errorf("%s: want exactly one of run and sub", name)
		}
		for sn, sub := range cmd.sub {
			if sub.run == nil || sub.usage == "" || sub.summary == "" {
				t.Errorf("%s %s: incomplete", name, sn)
			}
			if !strings.HasPrefix(sub.usage, "Usage: pullsecret "+name+" "+sn) {
				t.Errorf("%s %s: usage starts %q", name, sn, sub.usage[:min(40, len(sub.usage))])
			}
		}
	}
}

func TestGlobalHome(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := filepath.Join(t.TempDir(), "other")
	// --home before the command overrides PULLSECRET_HOME.
	e.must(canary+"\n", "--home", other, "secret", "create", "a", "--registry", "a.io", "--username", "u", "--password-stdin")
	e.must(canary, "--home="+other, "secret", "create", "b", "--registry", "b.io", "--username", "u", "--password-stdin")
	if out := e.must("", "secret", "list"); strings.Contains(out, "a.io") {
		t.Errorf("PULLSECRET_HOME store holds a secret created with --home:\n%s", out)
	}
	for _, args := range [][]string{
		{"--home", other, "secret", "list"},
		{"secret", "list", "--home", other},
		{"secret", "--help"}, // no store needed
	} {
		out := e.must("", args...)
		if args[len(args)-1] != "--help" && (!strings.Contains(out, "a.io") || !strings.Contains(out, "b.io")) {
			t.Errorf("%q: %s", args, out)
		}
	}
	checkHomeNoCanary(t, other)
	if _, err := os.Stat(filepath.Join(other, "secrets.json")); err != nil {
		t.Fatal(err)
	}
}

func TestNoHome(t *testing.T) {
	t.Parallel()
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"secret", "list"}, nil, &out, &errb, func(string) string { return "" })
	if code != 1 || !strings.Contains(errb.String(), "PULLSECRET_HOME") {
		t.Fatalf("exit %d, stderr %q", code, errb.String())
	}
}

// FuzzRun feeds arbitrary arguments and standard input to the CLI: it must
// exit 0, 1 or 2 with a prefixed message, and never panic.
func FuzzRun(f *testing.F) {
	for _, s := range []string{
		"secret\x00create\x00x\x00--registry\x00r.io\x00--username\x00u\x00--password-stdin",
		"secret\x00create\x00--token-stdin=false\x00--registry=a.io/b\x00x",
		"secret\x00list\x00-o\x00json\x00--all-projects",
		"secret\x00show\x00x\x00--\x00-o",
		"secret\x00rotate\x00x\x00--password-stdin\x00--username\x00--",
		"secret\x00import\x00--from-dockerconfig\x00-",
		"secret\x00delete\x00x\x00--project=\x00",
		"key\x00rotate", "help\x00secret\x00create", "version\x00-h", "--version",
	} {
		f.Add(s, canary+"\n")
	}
	f.Fuzz(func(t *testing.T, argv, stdin string) {
		// Only --home (and the env, which is fixed) names where to write,
		// and `cluster init DIR`: keep the fuzzer inside its temporary
		// folder.
		if strings.Contains(argv, "home") || strings.Contains(argv, "/dev") || strings.Contains(argv, "cluster") {
			t.Skip()
		}
		args := strings.Split(argv, "\x00")
		var out, errb bytes.Buffer
		home := t.TempDir()
		getenv := func(k string) string {
			if k == "PULLSECRET_HOME" {
				return home
			}
			return ""
		}
		code := run(context.Background(), args, strings.NewReader(stdin), &out, &errb, getenv)
		if code < 0 || code > 2 || strings.Contains(errb.String(), "internal error") {
			t.Fatalf("pullsecret %q: exit %d, stderr %q", args, code, errb.String())
		}
		if code != 0 && !strings.HasPrefix(errb.String(), "pullsecret: ") {
			t.Fatalf("pullsecret %q: exit %d, stderr %q", args, code, errb.String())
		}
	})
}
