package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/internal/testbin"
)

// TestProcess runs the built binary as operators do, to check real exit
// codes, streams and the environment.
func TestProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := filepath.Join(testbin.Build(t, "pullsecret"), "pullsecret")
	home := filepath.Join(t.TempDir(), "home")
	var outputs []string
	pullsecret := func(stdin string, env []string, args ...string) (int, string, string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "PULLSECRET_HOME=" + home}, env...)
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		outputs = append(outputs, out.String(), errb.String())
		return code, out.String(), errb.String()
	}
	for _, tc := range []struct {
		stdin  string
		env    []string
		args   []string
		code   int
		stdout string // regexp
		stderr string // regexp
	}{
		{args: []string{"version"}, stdout: `^pullsecret \S+ \(go1\.\d+`},
		{args: nil, code: 2, stderr: `^pullsecret: missing command\n\nUsage: pullsecret`},
		{args: []string{"secret", "bogus"}, code: 2, stderr: `^pullsecret: unknown command "secret bogus"\n\nUsage: pullsecret secret`},
		{args: []string{"secret", "create", "x", "--registry", "r.io", "--username", "u", "--password", canary}, code: 2, stderr: `unknown flag --password`},
		{args: []string{"secret", "create", "Bad_Name", "--registry", "r.io", "--username", "u", "--password-stdin"}, stdin: canary, code: 1,
			stderr: `^pullsecret: secret name: invalid name "Bad_Name": .*\n$`},
		{args: []string{"secret", "create", "app", "--registry", "r.io", "--username", "u", "--password-stdin"}, stdin: "", code: 1,
			stderr: `^pullsecret: no password on standard input`},
		{args: []string{"secret", "create", "app", "--registry", "r.io", "--username", "u", "--password-stdin"}, stdin: canary + "\n",
			stdout: `^created secret app for r.io \(basic, project default\)\n$`},
		{args: []string{"secret", "create", "--token-stdin", "--project", "p2", "--registry=t.io", "tok"}, stdin: canary,
			stdout: `^created secret tok for t.io \(token, project p2\)\n$`},
		{env: []string{"PULLSECRET_PROJECT=p2"}, args: []string{"secret", "list"}, stdout: `(?m)^tok\s+token\s+t\.io\s+1\s`},
		{args: []string{"secret", "show", "app"}, stdout: `Kind:\s+basic`},
		{args: []string{"secret", "import", "--from-dockerconfig", fixture("config-auth.json")},
			stdout: `imported docker-io for docker\.io \(basic, version 1, created\)`, stderr: `pullsecret: note: skipped desktop\.example`},
		{args: []string{"secret", "import", "--from-dockerconfig", fixture("malformed.json")}, code: 1,
			stderr: `^pullsecret: \S+malformed\.json: not valid JSON \(syntax error at line 1, column \d+\)\n$`},
		{args: []string{"key", "rotate"}, stdout: `^[0-9a-f]{16}\n$`},
		{args: []string{"secret", "rotate", "app", "--password-stdin"}, stdin: canary, stdout: `version 2`},
		{args: []string{"secret", "delete", "app"}, stdout: `^deleted secret app`},
		{args: []string{"secret", "delete", "app"}, code: 1, stderr: `^pullsecret: secret app in project default: pull secret not found\n$`},
		{args: []string{"--home", filepath.Join(t.TempDir(), "h2"), "secret", "list", "-o", "json"}, stdout: `^\[\]\n$`},
	} {
		code, out, errs := pullsecret(tc.stdin, tc.env, tc.args...)
		if code != tc.code || !regexp.MustCompile(tc.stdout).MatchString(out) || !regexp.MustCompile(tc.stderr).MatchString(errs) {
			t.Errorf("pullsecret %q: exit %d (want %d)\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out, errs)
		}
		if tc.stderr == "" && errs != "" {
			t.Errorf("pullsecret %q: stderr %q", tc.args, errs)
		}
	}
	for _, o := range outputs {
		if strings.Contains(o, canary) {
			t.Errorf("canary printed: %s", o)
		}
	}
	checkHomeNoCanary(t, home)
}
