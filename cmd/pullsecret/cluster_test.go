package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

func TestClusterInit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir := filepath.Join(t.TempDir(), "shared")
	out := e.must("", "cluster", "init", dir)
	for _, name := range []string{"key", "cluster-secret", proxy.SigningKeysFile} {
		if !strings.Contains(out, name) {
			t.Errorf("the output does not name %s:\n%s", name, out)
		}
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("DIR: %v %v", fi.Mode(), err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 3 {
		t.Errorf("DIR holds %d entries, want exactly the three files (no lock or temporary file): %v", len(ents), ents)
	}
	before := map[string][]byte{}
	for _, ent := range ents {
		p := filepath.Join(dir, ent.Name())
		fi, _ := os.Stat(p)
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v", ent.Name(), fi.Mode())
		}
		before[ent.Name()], _ = os.ReadFile(p)
		if strings.Contains(out, strings.TrimSpace(string(before[ent.Name()]))) {
			t.Errorf("the output shows the content of %s", ent.Name())
		}
	}

	// Each file is what its user reads.
	k, err := secret.LoadKeyring(filepath.Join(dir, "key"))
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := k.Seal([]byte("v"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Open(sealed, nil); err != nil {
		t.Fatal(err)
	}
	cc := proxy.ClusterConfig{SecretFile: filepath.Join(dir, "cluster-secret")}
	if b, err := cc.ReadSecret(); err != nil || len(b) < 64 {
		t.Fatalf("cluster secret: %d bytes, %v", len(b), err)
	}
	if _, err := proxy.LoadSignerFile(filepath.Join(dir, proxy.SigningKeysFile)); err != nil {
		t.Fatal(err)
	}
	// A second DIR gets other keys.
	other := filepath.Join(t.TempDir(), "other")
	e.must("", "cluster", "init", other)
	for name, b := range before {
		if b2, _ := os.ReadFile(filepath.Join(other, name)); string(b2) == string(b) {
			t.Errorf("%s is the same in two inits", name)
		}
	}

	// Never replaced, not even one file of three.
	r := e.run("", "cluster", "init", dir)
	if r.code != 1 || !strings.Contains(r.stderr, "never replaced") {
		t.Fatalf("init over an existing DIR: exit %d %q", r.code, r.stderr)
	}
	partial := t.TempDir()
	os.WriteFile(filepath.Join(partial, "cluster-secret"), []byte("mine-of-at-least-32-bytes-0123456789abcdef\n"), 0o600)
	if r := e.run("", "cluster", "init", partial); r.code != 1 {
		t.Fatalf("init over one existing file: exit %d %q", r.code, r.stderr)
	}
	if ents, _ := os.ReadDir(partial); len(ents) != 1 {
		t.Errorf("a refused init left files: %v", ents)
	}
	for name, b := range before {
		if b2, _ := os.ReadFile(filepath.Join(dir, name)); string(b2) != string(b) {
			t.Errorf("%s changed", name)
		}
	}

	for _, args := range [][]string{{"cluster", "init"}, {"cluster", "init", "a", "b"}, {"cluster", "init", "--force", dir}} {
		if r := e.run("", args...); r.code != 2 {
			t.Errorf("%q: exit %d %q", args, r.code, r.stderr)
		}
	}
}
