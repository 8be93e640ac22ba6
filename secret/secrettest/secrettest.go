// Package secrettest is the contract of secret.Backend as a test suite: every
// implementation (the data folder's file, PostgreSQL) runs TestBackend, so
// that a Store behaves the same over each.
//
// The package is for tests only.
package secrettest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/secret"
)

// Canary is the secret value the suite stores: it must never be found in
// the clear in what a backend keeps.
const Canary = "canary-secrettest-5c0e2b"

// Open returns n handles on one new, empty backend, as n processes (server
// replicas, the CLI) each open it. Handles are closed at the test's cleanup.
type Open func(t *testing.T, n int) []secret.Backend

// TestBackend runs the contract of secret.Backend against open.
func TestBackend(t *testing.T, open Open) {
	t.Run("UpdateLoad", func(t *testing.T) { t.Parallel(); testUpdateLoad(t, open) })
	t.Run("LoadHost", func(t *testing.T) { t.Parallel(); testLoadHost(t, open) })
	t.Run("FailedUpdate", func(t *testing.T) { t.Parallel(); testFailedUpdate(t, open) })
	t.Run("ConcurrentUpdates", func(t *testing.T) { t.Parallel(); testConcurrentUpdates(t, open) })
	t.Run("StoreAcrossHandles", func(t *testing.T) { t.Parallel(); testStoreAcrossHandles(t, open) })
	t.Run("ConcurrentRotations", func(t *testing.T) { t.Parallel(); testConcurrentRotations(t, open) })
	t.Run("RotateKey", func(t *testing.T) { t.Parallel(); testRotateKey(t, open) })
	t.Run("TamperedRecord", func(t *testing.T) { t.Parallel(); testTampered(t, open) })
}

// raw makes a record with a stand-in sealed value: the backend must keep
// records as they are, whatever they hold.
func raw(project, name string, version int, regs ...string) secret.Record {
	ps := make([]secret.Pattern, len(regs))
	for i, r := range regs {
		ps[i] = secret.Pattern(r)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 678901234, time.UTC)
	sealed, _ := json.Marshal(secret.Sealed{KeyID: "k-" + name, Nonce: []byte("nonce-" + name), Data: []byte("data-" + name)})
	return secret.Record{
		Secret: secret.Secret{Project: project, Name: name, Kind: secret.Basic, Registries: ps,
			Version: version, Created: at, Updated: at.Add(time.Duration(version) * time.Second)},
		Sealed: sealed,
	}
}

func sameRecord(a, b secret.Record) bool {
	var sa, sb secret.Sealed
	if json.Unmarshal(a.Sealed, &sa) != nil || json.Unmarshal(b.Sealed, &sb) != nil {
		return false
	}
	return a.Project == b.Project && a.Name == b.Name && a.Kind == b.Kind &&
		slices.Equal(a.Registries, b.Registries) && a.Version == b.Version &&
		a.Created.Equal(b.Created) && a.Updated.Equal(b.Updated) &&
		sa.KeyID == sb.KeyID && string(sa.Nonce) == string(sb.Nonce) && string(sa.Data) == string(sb.Data)
}

// checkRecords fails unless got holds exactly want, in any order.
func checkRecords(t *testing.T, what string, got, want []secret.Record) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d records, want %d: %v", what, len(got), len(want), names(got))
	}
	for _, w := range want {
		i := slices.IndexFunc(got, func(g secret.Record) bool { return g.Project == w.Project && g.Name == w.Name })
		if i < 0 {
			t.Fatalf("%s: %s/%s missing from %v", what, w.Project, w.Name, names(got))
		}
		if !sameRecord(got[i], w) {
			t.Fatalf("%s: %s/%s is %+v, want %+v", what, w.Project, w.Name, got[i].Secret, w.Secret)
		}
	}
}

func names(recs []secret.Record) []string {
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = r.Project + "/" + r.Name
	}
	return out
}

func load(t *testing.T, b secret.Backend) []secret.Record {
	t.Helper()
	recs, err := b.Load(context.Background())
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	return recs
}

func testUpdateLoad(t *testing.T, open Open) {
	ctx := context.Background()
	h := open(t, 2)
	checkRecords(t, "empty", load(t, h[0]), nil)
	a, b := raw("p1", "a", 1, "a.io"), raw("p2", "b", 1, "b.io:5000/team")
	err := h[0].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) {
		if len(recs) != 0 {
			return nil, fmt.Errorf("fresh backend gave %d records", len(recs))
		}
		return append(recs, a, b), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The other handle sees the write at once.
	checkRecords(t, "after insert", load(t, h[1]), []secret.Record{a, b})
	a2, c := raw("p1", "a", 2, "a.io", "a2.io/x"), raw("p1", "c", 1, "c.io")
	err = h[1].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) {
		checkRecords(t, "update sees", recs, []secret.Record{a, b})
		var out []secret.Record
		for _, r := range recs {
			switch r.Name {
			case "a":
				out = append(out, a2)
			case "b": // deleted
			default:
				out = append(out, r)
			}
		}
		return append(out, c), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	checkRecords(t, "after replace, delete, insert", load(t, h[0]), []secret.Record{a2, c})
	// An update that changes nothing keeps everything.
	if err := h[0].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) { return recs, nil }); err != nil {
		t.Fatal(err)
	}
	checkRecords(t, "after a no-op update", load(t, h[1]), []secret.Record{a2, c})
	if s := h[0].String(); s == "" {
		t.Error("String is empty: messages could not say where the records are")
	}
}

func testLoadHost(t *testing.T, open Open) {
	ctx := context.Background()
	h := open(t, 1)[0]
	recs := []secret.Record{
		raw("p", "a", 1, "a.io"),
		raw("p", "b", 1, "b.io:5000/team", "c.io"),
		raw("q", "c", 1, "c.io/x"),
		raw("q", "d", 1, "d.io"),
	}
	if err := h.Update(ctx, func([]secret.Record) ([]secret.Record, error) { return slices.Clone(recs), nil }); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host string
		want []string
	}{
		{"a.io", []string{"p/a"}},
		{"b.io:5000", []string{"p/b"}},
		{"c.io", []string{"p/b", "q/c"}},
		{"none.io", nil},
	} {
		got, err := h.LoadHost(ctx, tc.host)
		if err != nil {
			t.Fatalf("LoadHost(%s): %v", tc.host, err)
		}
		// Every record on the host, each whole; others may come along.
		for _, w := range tc.want {
			i := slices.IndexFunc(got, func(r secret.Record) bool { return r.Project+"/"+r.Name == w })
			if i < 0 {
				t.Fatalf("LoadHost(%s) = %v, missing %s", tc.host, names(got), w)
			}
			j := slices.IndexFunc(recs, func(r secret.Record) bool { return r.Project+"/"+r.Name == w })
			if !sameRecord(got[i], recs[j]) {
				t.Fatalf("LoadHost(%s): %s is %+v", tc.host, w, got[i].Secret)
			}
		}
	}
}

var errFail = errors.New("fn failed on purpose")

func testFailedUpdate(t *testing.T, open Open) {
	ctx := context.Background()
	h := open(t, 2)
	a := raw("p", "a", 1, "a.io")
	if err := h[0].Update(ctx, func([]secret.Record) ([]secret.Record, error) { return []secret.Record{a}, nil }); err != nil {
		t.Fatal(err)
	}
	err := h[0].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) {
		recs[0].Version = 99 // edits its own copy, then fails
		return append(recs, raw("p", "b", 1, "b.io")), errFail
	})
	if !errors.Is(err, errFail) {
		t.Fatalf("Update = %v, want the error of fn", err)
	}
	checkRecords(t, "after a failed update", load(t, h[1]), []secret.Record{a})
	// The backend is still usable (no lock or transaction left behind).
	done := make(chan error, 1)
	go func() {
		done <- h[1].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) { return recs, nil })
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("an update after a failed one is still waiting after 10s: the failed one left a lock held")
	}
}

// testConcurrentUpdates: writers on every handle at once; every update is
// kept and each saw the one before it.
func testConcurrentUpdates(t *testing.T, open Open) {
	ctx := context.Background()
	const handles, perHandle, each = 3, 3, 5
	h := open(t, handles)
	counter := raw("p", "counter", 0, "counter.io")
	if err := h[0].Update(ctx, func([]secret.Record) ([]secret.Record, error) { return []secret.Record{counter}, nil }); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, handles*perHandle)
	for i := range handles {
		for g := range perHandle {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := range each {
					err := h[i].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) {
						j := slices.IndexFunc(recs, func(r secret.Record) bool { return r.Name == "counter" })
						if j < 0 {
							return nil, errors.New("counter record missing")
						}
						recs[j].Version++
						return append(recs, raw("p", fmt.Sprintf("w%d-%d-%d", i, g, n), 1, "w.io")), nil
					})
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	recs := load(t, h[handles-1])
	if want := handles*perHandle*each + 1; len(recs) != want {
		t.Fatalf("%d records, want %d: updates were lost", len(recs), want)
	}
	j := slices.IndexFunc(recs, func(r secret.Record) bool { return r.Name == "counter" })
	if got, want := recs[j].Version, handles*perHandle*each; got != want {
		t.Fatalf("counter %d, want %d: an update did not see the one before it", got, want)
	}
}

// stores opens a Store over each handle, as replicas do: each its own data
// folder, one key file shared by all (mounted from one Kubernetes Secret).
func stores(t *testing.T, h []secret.Backend) []*secret.Store {
	t.Helper()
	key := filepath.Join(t.TempDir(), "master.key")
	out := make([]*secret.Store, len(h))
	for i, b := range h {
		s, err := secret.Open(filepath.Join(t.TempDir(), "home"), secret.WithKeyFile(key), secret.WithBackend(b))
		if err != nil {
			t.Fatal(err)
		}
		out[i] = s
	}
	return out
}

func basic(name string, regs ...string) secret.Secret {
	ps := make([]secret.Pattern, len(regs))
	for i, r := range regs {
		ps[i] = secret.Pattern(r)
	}
	return secret.Secret{Name: name, Kind: secret.Basic, Registries: ps}
}

func resolve(t *testing.T, s *secret.Store, target string) (secret.Secret, secret.Credential, error) {
	t.Helper()
	tg, err := secret.ParseServerURL(target)
	if err != nil {
		t.Fatal(err)
	}
	return s.Resolve(context.Background(), "", tg)
}

func testStoreAcrossHandles(t *testing.T, open Open) {
	ctx := context.Background()
	s := stores(t, open(t, 2))
	if _, err := s[0].Create(ctx, basic("ghcr", "ghcr.io/acme"), secret.Value{Username: "bot", Password: Canary + "-1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s[0].Create(ctx, basic("hub", "docker.io"), secret.Value{Username: "hub", Password: "other"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s[1].Create(ctx, basic("ghcr", "quay.io"), secret.Value{Username: "u", Password: "p"}); !errors.Is(err, secret.ErrExists) {
		t.Fatalf("create of a taken name through the other handle: %v, want ErrExists", err)
	}
	sec, c, err := resolve(t, s[1], "ghcr.io/acme/app")
	if err != nil || c.Password != Canary+"-1" || sec.Version != 1 {
		t.Fatalf("resolve through the other handle: %v (version %d)", err, sec.Version)
	}
	// A rotation through one handle is what the next lookup of every
	// other handle uses.
	if _, err := s[1].Rotate(ctx, "", "ghcr", secret.Value{Password: Canary + "-2"}); err != nil {
		t.Fatal(err)
	}
	sec, c, err = resolve(t, s[0], "ghcr.io/acme/app")
	if err != nil || c.Password != Canary+"-2" || c.Username != "bot" || sec.Version != 2 {
		t.Fatalf("after rotation elsewhere: %v (version %d)", err, sec.Version)
	}
	list, err := s[0].List(ctx, "")
	if err != nil || len(list) != 2 || list[0].Name != "ghcr" || list[1].Name != "hub" {
		t.Fatalf("list: %v %+v", err, list)
	}
	if _, err := s[1].RemoveRegistry(ctx, "", "docker.io"); err != nil {
		t.Fatal(err)
	}
	if err := s[0].Delete(ctx, "", "ghcr"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := resolve(t, s[1], "ghcr.io/acme/app"); !errors.Is(err, secret.ErrNotFound) {
		t.Fatalf("resolve after delete elsewhere: %v, want ErrNotFound", err)
	}
	if list, err := s[1].List(ctx, ""); err != nil || len(list) != 0 {
		t.Fatalf("list after delete: %v %+v", err, list)
	}
}

// testConcurrentRotations: rotations of one secret through every handle at
// once; the version counts each one.
func testConcurrentRotations(t *testing.T, open Open) {
	ctx := context.Background()
	s := stores(t, open(t, 3))
	if _, err := s[0].Create(ctx, basic("victim", "reg.io"), secret.Value{Username: "u", Password: Canary}); err != nil {
		t.Fatal(err)
	}
	const each = 4
	var wg sync.WaitGroup
	for i := range s {
		for n := range each {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := s[i].Rotate(ctx, "", "victim", secret.Value{Password: fmt.Sprintf("%s-%d-%d", Canary, i, n)}); err != nil {
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	sec, c, err := resolve(t, s[2], "reg.io")
	if err != nil || !strings.HasPrefix(c.Password, Canary+"-") {
		t.Fatalf("after concurrent rotations: %v", err)
	}
	if want := 1 + len(s)*each; sec.Version != want {
		t.Fatalf("version %d after %d rotations, want %d", sec.Version, len(s)*each, want)
	}
}

func testRotateKey(t *testing.T, open Open) {
	ctx := context.Background()
	h := open(t, 2)
	s := stores(t, h)
	for i := range 3 {
		if _, err := s[i%2].Create(ctx, basic(fmt.Sprint("s", i), fmt.Sprintf("r%d.io", i)), secret.Value{Username: "u", Password: fmt.Sprint(Canary, i)}); err != nil {
			t.Fatal(err)
		}
	}
	id, err := s[0].RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range load(t, h[1]) {
		var sl secret.Sealed
		if err := json.Unmarshal(r.Sealed, &sl); err != nil || sl.KeyID != id {
			t.Fatalf("%s sealed by %q after rotation to %s (%v)", r.Name, sl.KeyID, id, err)
		}
		if strings.Contains(string(r.Sealed), Canary) {
			t.Fatal("a sealed record holds the value in the clear")
		}
	}
	for i := range 3 {
		if _, c, err := resolve(t, s[1], fmt.Sprintf("r%d.io", i)); err != nil || c.Password != fmt.Sprint(Canary, i) {
			t.Fatalf("after key rotation: %v", err)
		}
	}
}

// testTampered: metadata edited behind the store's back (registries
// pointed elsewhere) makes the value fail to open rather than go there.
func testTampered(t *testing.T, open Open) {
	ctx := context.Background()
	h := open(t, 1)
	s := stores(t, h)[0]
	if _, err := s.Create(ctx, basic("a", "reg.io"), secret.Value{Username: "u", Password: Canary}); err != nil {
		t.Fatal(err)
	}
	err := h[0].Update(ctx, func(recs []secret.Record) ([]secret.Record, error) {
		recs[0].Registries = []secret.Pattern{"evil.example"}
		return recs, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = resolve(t, s, "evil.example")
	if !errors.Is(err, secret.ErrKey) {
		t.Fatalf("resolve of a redirected record: %v, want ErrKey", err)
	}
	if strings.Contains(err.Error(), Canary) {
		t.Fatal("the error holds the value")
	}
}
