package secret

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const canary = "canary-pw-7d41e9"

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "home"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func pats(t *testing.T, ss ...string) []Pattern {
	t.Helper()
	var out []Pattern
	for _, s := range ss {
		p, err := ParsePattern(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

func basic(t *testing.T, name string, regs ...string) Secret {
	return Secret{Name: name, Kind: Basic, Registries: pats(t, regs...)}
}

func TestStoreCRUD(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	sec, err := s.Create(ctx, basic(t, "ghcr", "ghcr.io/acme"), Value{Username: "bot", Password: canary})
	if err != nil {
		t.Fatal(err)
	}
	if sec.Project != DefaultProject || sec.Version != 1 || sec.Created.IsZero() {
		t.Fatalf("created %+v", sec)
	}
	if _, err := s.Create(ctx, basic(t, "ghcr", "ghcr.io/other"), Value{Username: "u", Password: "p"}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	if _, err := s.Create(ctx, basic(t, "dup", "ghcr.io/acme"), Value{Username: "u", Password: "p"}); err == nil || !strings.Contains(err.Error(), "already covered by secret ghcr") {
		t.Fatalf("same pattern in two secrets: %v", err)
	}
	// The same pattern in another project is fine.
	other := basic(t, "ghcr", "ghcr.io/acme")
	other.Project = "team-b"
	if _, err := s.Create(ctx, other, Value{Username: "b", Password: "pb"}); err != nil {
		t.Fatal(err)
	}
	rot, err := s.Rotate(ctx, "", "ghcr", Value{Password: "new-" + canary})
	if err != nil {
		t.Fatal(err)
	}
	if rot.Version != 2 || !rot.Created.Equal(sec.Created) {
		t.Fatalf("rotated %+v", rot)
	}
	_, v, err := s.Value(ctx, "", "ghcr")
	if err != nil || v.Username != "bot" || v.Password != "new-"+canary {
		t.Fatalf("value after rotate: %v %v", v.Username, err)
	}
	list, err := s.List(ctx, "")
	if err != nil || len(list) != 2 {
		t.Fatalf("list all: %d %v", len(list), err)
	}
	list, err = s.List(ctx, "team-b")
	if err != nil || len(list) != 1 || list[0].Project != "team-b" {
		t.Fatalf("list team-b: %+v %v", list, err)
	}
	if err := s.Delete(ctx, "", "ghcr"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "", "ghcr"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := s.Get(ctx, "", "ghcr"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	for _, tc := range []struct {
		name string
		sec  Secret
		v    Value
		want string
	}{
		{"bad name", basic(t, "Bad_Name", "r.io"), Value{Username: "u", Password: "p"}, "invalid name"},
		{"bad project", Secret{Project: "A B", Name: "x", Kind: Basic, Registries: pats(t, "r.io")}, Value{Username: "u", Password: "p"}, "project"},
		{"no registry", Secret{Name: "x", Kind: Basic}, Value{Username: "u", Password: "p"}, "at least one registry"},
		{"repeated registry", basic(t, "x", "r.io", "https://r.io/"), Value{Username: "u", Password: "p"}, "given twice"},
		{"no password", basic(t, "x", "r.io"), Value{Username: "u"}, "needs a username and a password"},
		{"token without token", Secret{Name: "x", Kind: Token, Registries: pats(t, "r.io")}, Value{}, "needs a token"},
		{"unknown kind", Secret{Name: "x", Kind: "magic", Registries: pats(t, "r.io")}, Value{}, "unknown kind"},
	} {
		_, err := s.Create(ctx, tc.sec, tc.v)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("invalid creates wrote the store: %v", err)
	}
}

func TestMatchLongestWins(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	for name, regs := range map[string][]string{
		"whole": {"reg.io"},
		"team":  {"reg.io/team"},
		"app":   {"reg.io/team/app"},
		"hub":   {"docker.io/acme"},
	} {
		if _, err := s.Create(ctx, basic(t, name, regs...), Value{Username: name, Password: "p"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ target, want string }{
		{"reg.io", "whole"},
		{"reg.io/teamb", "whole"},
		{"reg.io/team", "team"},
		{"reg.io/team/other", "team"},
		{"reg.io/team/app", "app"},
		{"reg.io/team/app/sub", "app"},
		{"https://index.docker.io/v1/", "hub"}, // only one secret covers part of the host
		{"docker.io/acme/x", "hub"},
		{"reg.io:5000", ""},
		{"docker.io/library/alpine", ""},
	} {
		target, err := ParseServerURL(tc.target)
		if err != nil {
			t.Fatal(err)
		}
		sec, cred, err := s.Resolve(ctx, "", target)
		// MatchSecret names the same secret from the list, values unopened.
		all, lerr := s.List(ctx, "")
		if lerr != nil {
			t.Fatal(lerr)
		}
		named, merr := MatchSecret(all, "", target)
		if tc.want == "" {
			if !errors.Is(err, ErrNotFound) || !errors.Is(merr, ErrNotFound) {
				t.Errorf("%s: %v / MatchSecret %v, want not found", tc.target, err, merr)
			}
			continue
		}
		if err != nil || sec.Name != tc.want || cred.Username != tc.want {
			t.Errorf("%s: got %s (%v), want %s", tc.target, sec.Name, err, tc.want)
		}
		if merr != nil || named.Name != tc.want {
			t.Errorf("%s: MatchSecret %s (%v), want %s", tc.target, named.Name, merr, tc.want)
		}
	}
	// Two secrets covering parts of a host and a client naming no
	// repository: an error that names both, not a guess.
	if _, err := s.Create(ctx, basic(t, "hub2", "docker.io/other"), Value{Username: "u", Password: "p"}); err != nil {
		t.Fatal(err)
	}
	_, _, err := s.Resolve(ctx, "", Target{Host: DockerHub})
	if err == nil || !strings.Contains(err.Error(), "hub, hub2") {
		t.Errorf("ambiguous host: %v", err)
	}
	// Projects are separate.
	if _, _, err := s.Resolve(ctx, "team-b", Target{Host: "reg.io"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("other project: %v", err)
	}
}

func TestTokenKind(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	sec := Secret{Name: "tok", Kind: Token, Registries: pats(t, "reg.io")}
	if _, err := s.Create(ctx, sec, Value{IdentityToken: canary}); err != nil {
		t.Fatal(err)
	}
	_, c, err := s.Resolve(ctx, "", Target{Host: "reg.io"})
	if err != nil || c.IdentityToken != canary {
		t.Fatalf("resolve token: %v", err)
	}
	if strings.Contains(fmt.Sprintf("%v %+v %#v", c, c, c), canary) {
		t.Fatal("formatting a credential prints it")
	}
}

// TestAtRest checks files, modes and that the value is only ciphertext.
func TestAtRest(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	if _, err := s.Create(ctx, basic(t, "a", "reg.io"), Value{Username: "canary-user", Password: canary}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(s.Home())
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("home mode %v %v", fi.Mode(), err)
	}
	err = filepath.WalkDir(s.Home(), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", path, fi.Mode().Perm())
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(canary)) || bytes.Contains(b, []byte("canary-user")) {
			t.Errorf("%s holds the value in the clear", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestDamagedStore(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, s *Store)
		want   string
	}{
		{"truncated", func(t *testing.T, s *Store) {
			b, _ := os.ReadFile(s.Path())
			os.WriteFile(s.Path(), b[:len(b)/2], 0o600)
		}, "damaged"},
		{"garbage", func(t *testing.T, s *Store) {
			os.WriteFile(s.Path(), []byte("\x00\x01not json"), 0o600)
		}, "damaged"},
		{"ciphertext flipped", func(t *testing.T, s *Store) {
			editDoc(t, s, func(d *document) {
				var sl Sealed
				json.Unmarshal(d.Secrets[0].Sealed, &sl)
				sl.Data[0] ^= 1
				d.Secrets[0].Sealed, _ = json.Marshal(sl)
			})
		}, "wrong key or tampered"},
		{"registry redirected", func(t *testing.T, s *Store) {
			editDoc(t, s, func(d *document) {
				d.Secrets[0].Registries = []Pattern{"evil.example"}
				d.Secrets[1].Registries = []Pattern{"other.io"}
			})
		}, "wrong key or tampered"},
		{"wrong key", func(t *testing.T, s *Store) {
			k, err := NewKeyring()
			if err != nil {
				t.Fatal(err)
			}
			if err := k.Save(s.keyPath); err != nil {
				t.Fatal(err)
			}
		}, "is not in the keyring"},
		{"key file damaged", func(t *testing.T, s *Store) {
			os.WriteFile(s.keyPath, []byte("{"), 0o600)
		}, "key file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newStore(t)
			if _, err := s.Create(ctx, basic(t, "a", "reg.io"), Value{Username: "u", Password: canary}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Create(ctx, basic(t, "b", "other.io"), Value{Username: "u", Password: "p"}); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, s)
			before, _ := os.ReadFile(s.Path())
			_, _, err := s.Resolve(ctx, "", Target{Host: "reg.io"})
			if tc.name == "registry redirected" {
				_, _, err = s.Resolve(ctx, "", Target{Host: "evil.example"})
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("resolve: %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), canary) {
				t.Fatal("error leaks the value")
			}
			if !strings.Contains(err.Error(), s.home) {
				t.Errorf("error %q does not name the file", err)
			}
			// A write on a damaged store refuses and changes nothing.
			if tc.name == "truncated" || tc.name == "garbage" {
				if _, err := s.Create(ctx, basic(t, "c", "c.io"), Value{Username: "u", Password: "p"}); err == nil {
					t.Fatal("create on a damaged store succeeded")
				}
				if _, err := s.RotateKey(ctx); err == nil {
					t.Fatal("key rotate on a damaged store succeeded")
				}
				after, _ := os.ReadFile(s.Path())
				if !bytes.Equal(before, after) {
					t.Fatal("damaged store was overwritten")
				}
			}
			if tc.name == "ciphertext flipped" || tc.name == "wrong key" {
				if _, err := s.RotateKey(ctx); err == nil {
					t.Fatal("key rotate with an unopenable record succeeded")
				}
				after, _ := os.ReadFile(s.Path())
				if !bytes.Equal(before, after) {
					t.Fatal("store changed by a failed key rotation")
				}
			}
		})
	}
}

func editDoc(t *testing.T, s *Store, fn func(*document)) {
	t.Helper()
	fb := s.backend.(*FileBackend)
	d, err := fb.load()
	if err != nil {
		t.Fatal(err)
	}
	fn(d)
	if err := fb.save(d); err != nil {
		t.Fatal(err)
	}
}

func TestRotateKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	for i := range 5 {
		if _, err := s.Create(ctx, basic(t, fmt.Sprintf("s%d", i), fmt.Sprintf("r%d.io", i)), Value{Username: "u", Password: fmt.Sprint(canary, i)}); err != nil {
			t.Fatal(err)
		}
	}
	k1, err := LoadKeyring(s.keyPath)
	if err != nil {
		t.Fatal(err)
	}
	id, err := s.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := LoadKeyring(s.keyPath)
	if err != nil {
		t.Fatal(err)
	}
	if id == k1.Current || k2.Current != id || len(k2.Keys) != 1 {
		t.Fatalf("keyring after rotate: %+v (old %s)", k2.Current, k1.Current)
	}
	d, _ := s.backend.(*FileBackend).load()
	for _, r := range d.Secrets {
		var sl Sealed
		json.Unmarshal(r.Sealed, &sl)
		if sl.KeyID != id {
			t.Errorf("%s still sealed by %s", r.Name, sl.KeyID)
		}
	}
	for i := range 5 {
		_, c, err := s.Resolve(ctx, "", Target{Host: fmt.Sprintf("r%d.io", i)})
		if err != nil || c.Password != fmt.Sprint(canary, i) {
			t.Fatalf("after rotate: %v", err)
		}
	}
}

func TestKeyFileOption(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	keyPath := filepath.Join(t.TempDir(), "master.key")
	s, err := Open(filepath.Join(t.TempDir(), "home"), WithKeyFile(keyPath))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, basic(t, "a", "reg.io"), Value{Username: "u", Password: "p"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(keyPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.Home(), keyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("key written to home too: %v", err)
	}
}

// TestConcurrentWriters runs writers in several processes and goroutines at
// once: every update must be present.
func TestConcurrentWriters(t *testing.T) {
	t.Parallel()
	home := filepath.Join(t.TempDir(), "home")
	const procs, each = 4, 15
	var wg sync.WaitGroup
	errs := make(chan error, procs*2)
	for p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperWriter$")
			cmd.Env = append(os.Environ(), "SECRET_TEST_WRITER=1", "SECRET_TEST_HOME="+home,
				"SECRET_TEST_PREFIX=p"+strconv.Itoa(p), "SECRET_TEST_COUNT="+strconv.Itoa(each))
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("writer %d: %v\n%s", p, err, out)
			}
		}()
	}
	// And goroutines in this process too.
	s, err := Open(home)
	if err != nil {
		t.Fatal(err)
	}
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := write(s, fmt.Sprintf("g%d", g), each); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	list, err := s.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if want := (procs + 2) * each; len(list) != want {
		t.Fatalf("%d secrets, want %d: updates were lost", len(list), want)
	}
	// Rotations by several writers of one secret: the version counts each.
	var rwg sync.WaitGroup
	for range 10 {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			if _, err := s.Rotate(context.Background(), "", "g0-0", Value{Password: "x"}); err != nil {
				t.Error(err)
			}
		}()
	}
	rwg.Wait()
	if sec, _ := s.Get(context.Background(), "", "g0-0"); sec.Version != 11 {
		t.Fatalf("version %d after 10 rotations, want 11", sec.Version)
	}
}

func write(s *Store, prefix string, n int) error {
	for i := range n {
		name := fmt.Sprintf("%s-%d", prefix, i)
		sec := Secret{Name: name, Kind: Basic, Registries: []Pattern{Pattern(name + ".example")}}
		if _, err := s.Create(context.Background(), sec, Value{Username: "u", Password: canary}); err != nil {
			return err
		}
	}
	return nil
}

// TestHelperWriter is the body of the writer processes.
func TestHelperWriter(t *testing.T) {
	if os.Getenv("SECRET_TEST_WRITER") != "1" {
		t.Skip("helper process for TestConcurrentWriters and TestKilledWriter")
	}
	s, err := Open(os.Getenv("SECRET_TEST_HOME"))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(os.Getenv("SECRET_TEST_COUNT"))
	if n == 0 {
		// Write until killed.
		for i := 0; ; i++ {
			if _, err := s.Rotate(context.Background(), "", "victim", Value{Password: fmt.Sprint(canary, i)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := write(s, os.Getenv("SECRET_TEST_PREFIX"), n); err != nil {
		t.Fatal(err)
	}
}

// TestKilledWriter kills writers at arbitrary moments: the store must
// always open with the old or the new content, and a later writer cleans up
// what a dead one left.
func TestKilledWriter(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	home := filepath.Join(t.TempDir(), "home")
	s, err := Open(home)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, basic(t, "victim", "reg.io"), Value{Username: "u", Password: canary}); err != nil {
		t.Fatal(err)
	}
	for round := range 8 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperWriter$")
		cmd.Env = append(os.Environ(), "SECRET_TEST_WRITER=1", "SECRET_TEST_HOME="+home, "SECRET_TEST_COUNT=0")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(20+round*7) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		sec, c, err := s.Resolve(ctx, "", Target{Host: "reg.io"})
		if err != nil {
			t.Fatalf("round %d: store does not open after a killed writer: %v", round, err)
		}
		if !strings.HasPrefix(c.Password, canary) || sec.Version < 1 {
			t.Fatalf("round %d: unexpected content", round)
		}
	}
	// The next write removes temporary files a killed writer left.
	if _, err := s.Rotate(ctx, "", "victim", Value{Password: "final"}); err != nil {
		t.Fatal(err)
	}
	left, _ := filepath.Glob(filepath.Join(home, ".*.tmp-*"))
	if len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
	var d document
	b, _ := os.ReadFile(s.Path())
	if err := json.Unmarshal(b, &d); err != nil || len(d.Secrets) != 1 {
		t.Fatalf("final store: %v", err)
	}
}

// TestLoadHostShapes: the line-filtered lookup and the full decode agree,
// and a file not in save's shape (here re-indented by hand) still works.
func TestLoadHostShapes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t)
	for i := range 20 {
		if _, err := s.Create(ctx, basic(t, fmt.Sprintf("s%d", i), fmt.Sprintf("r%d.io/team", i), fmt.Sprintf("m%d.io", i)), Value{Username: fmt.Sprint("u", i), Password: "p"}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(stage string) {
		for i := range 20 {
			for _, host := range []string{fmt.Sprintf("r%d.io/team/app", i), fmt.Sprintf("m%d.io", i)} {
				tg, _ := ParseServerURL(host)
				_, c, err := s.Resolve(ctx, "", tg)
				if err != nil || c.Username != fmt.Sprint("u", i) {
					t.Fatalf("%s: %s: %v %q", stage, host, err, c.Username)
				}
			}
		}
		if _, _, err := s.Resolve(ctx, "", Target{Host: "r1.io"}); err != nil {
			t.Fatalf("%s: host-only lookup of a prefix secret: %v", stage, err)
		}
	}
	check("as saved")
	d, err := s.backend.(*FileBackend).load()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(d, "", "    ")
	if err := os.WriteFile(s.Path(), b, 0o600); err != nil {
		t.Fatal(err)
	}
	check("re-indented")
	// A line of the saved shape that is damaged is reported, not skipped,
	// when it names the host being looked up.
	if _, err := s.Rotate(ctx, "", "s3", Value{Password: "q"}); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(s.Path())
	raw = bytes.Replace(raw, []byte(`"name":"s3"`), []byte(`"name":s3"`), 1)
	os.WriteFile(s.Path(), raw, 0o600)
	if _, _, err := s.Resolve(ctx, "", Target{Host: "m3.io"}); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged line: %v", err)
	}
}
