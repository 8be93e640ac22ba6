// Package proxytest holds the contracts of the proxy's storage interfaces
// as test suites, which every implementation (the data folder's files,
// PostgreSQL) runs.
//
// The package is for tests only.
package proxytest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
)

// OpenTokens returns n handles on one new, empty token store, as n
// processes (server replicas, the CLI) each open it. Handles are closed at
// the test's cleanup.
type OpenTokens func(t *testing.T, n int) []proxy.TokenBackend

// TestTokenBackend runs the contract of proxy.TokenBackend against open.
func TestTokenBackend(t *testing.T, open OpenTokens) {
	t.Run("InsertGet", func(t *testing.T) { t.Parallel(); testInsertGet(t, open) })
	t.Run("List", func(t *testing.T) { t.Parallel(); testList(t, open) })
	t.Run("Revoke", func(t *testing.T) { t.Parallel(); testRevoke(t, open) })
	t.Run("ConcurrentInserts", func(t *testing.T) { t.Parallel(); testConcurrentInserts(t, open) })
	t.Run("TokenStoreAcrossHandles", func(t *testing.T) { t.Parallel(); testTokenStoreAcrossHandles(t, open) })
}

// base is now, to the second as the token store keeps times: the file
// backend drops expired ephemeral tokens.
var base = time.Now().UTC().Truncate(time.Second)

func record(id, project string, created time.Time) proxy.TokenRecord {
	sum := sha256.Sum256([]byte("token-" + id))
	return proxy.TokenRecord{
		TokenInfo: proxy.TokenInfo{
			ID: id, Name: "n-" + id, Project: project,
			Scopes: []string{proxy.ScopePull, proxy.ScopePush}, Repositories: []string{"ghcr.io/acme", "quay.io/x/*"},
			Created: created, Expires: created.Add(24 * time.Hour),
		},
		Hash: sum[:],
	}
}

// sameInfo compares metadata as stored: times to the second (the token
// store truncates them), nil and empty lists alike.
func sameInfo(a, b proxy.TokenInfo) bool {
	rev := a.Revoked == nil && b.Revoked == nil ||
		a.Revoked != nil && b.Revoked != nil && a.Revoked.Equal(*b.Revoked)
	return rev && a.ID == b.ID && a.Name == b.Name && a.Project == b.Project &&
		slices.Equal(a.Scopes, b.Scopes) && slices.Equal(a.Repositories, b.Repositories) &&
		a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) && a.Ephemeral == b.Ephemeral
}

func testInsertGet(t *testing.T, open OpenTokens) {
	ctx := context.Background()
	h := open(t, 2)
	if _, err := h[0].Get(ctx, "0000000000000001"); !errors.Is(err, proxy.ErrTokenNotFound) {
		t.Fatalf("Get of an unknown id: %v, want ErrTokenNotFound", err)
	}
	rec := record("0000000000000001", "acme", base)
	if err := h[0].Insert(ctx, rec); err != nil {
		t.Fatal(err)
	}
	got, err := h[1].Get(ctx, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !sameInfo(got.TokenInfo, rec.TokenInfo) || string(got.Hash) != string(rec.Hash) {
		t.Fatalf("Get = %+v, want %+v", got, rec)
	}
	other := record(rec.ID, "other", base.Add(time.Hour))
	if err := h[1].Insert(ctx, other); !errors.Is(err, proxy.ErrTokenIDTaken) {
		t.Fatalf("Insert of a taken id: %v, want ErrTokenIDTaken", err)
	}
	if got, _ := h[0].Get(ctx, rec.ID); got.Project != "acme" {
		t.Fatal("a refused insert replaced the record")
	}
	// No list, no repositories, ephemeral: kept as they are.
	eph := record("0000000000000002", "acme", base)
	eph.Repositories, eph.Scopes, eph.Ephemeral, eph.Name = nil, []string{proxy.ScopePull}, true, ""
	if err := h[1].Insert(ctx, eph); err != nil {
		t.Fatal(err)
	}
	if got, err := h[0].Get(ctx, eph.ID); err != nil || !sameInfo(got.TokenInfo, eph.TokenInfo) {
		t.Fatalf("Get = %+v, %v; want %+v", got.TokenInfo, err, eph.TokenInfo)
	}
	// What Get returns is the caller's: changing it changes nothing stored.
	mine, err := h[1].Get(ctx, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	mine.Scopes[0], mine.Repositories[0], mine.Hash[0] = "changed", "changed", mine.Hash[0]^1
	again, err := h[1].Get(ctx, rec.ID)
	if err != nil || again.Scopes[0] != proxy.ScopePull || again.Repositories[0] != "ghcr.io/acme" || again.Hash[0] != rec.Hash[0] {
		t.Fatal("a caller's change to a returned record reached the store")
	}
}

func testList(t *testing.T, open OpenTokens) {
	ctx := context.Background()
	h := open(t, 2)
	if list, err := h[0].List(ctx, ""); err != nil || len(list) != 0 {
		t.Fatalf("List of an empty store: %v %v", list, err)
	}
	// Inserted out of order: List is oldest first.
	recs := []proxy.TokenRecord{
		record("00000000000000a3", "acme", base.Add(3*time.Second)),
		record("00000000000000a1", "acme", base.Add(1*time.Second)),
		record("00000000000000b2", "beta", base.Add(2*time.Second)),
	}
	for i, r := range recs {
		if err := h[i%2].Insert(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		project string
		want    []string
	}{
		{"", []string{"00000000000000a1", "00000000000000b2", "00000000000000a3"}},
		{"acme", []string{"00000000000000a1", "00000000000000a3"}},
		{"beta", []string{"00000000000000b2"}},
		{"none", nil},
	} {
		list, err := h[1].List(ctx, tc.project)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, info := range list {
			ids = append(ids, info.ID)
			i := slices.IndexFunc(recs, func(r proxy.TokenRecord) bool { return r.ID == info.ID })
			if !sameInfo(info, recs[i].TokenInfo) {
				t.Fatalf("List(%q): %+v, want %+v", tc.project, info, recs[i].TokenInfo)
			}
		}
		if !slices.Equal(ids, tc.want) {
			t.Fatalf("List(%q) = %v, want %v", tc.project, ids, tc.want)
		}
	}
}

func testRevoke(t *testing.T, open OpenTokens) {
	ctx := context.Background()
	h := open(t, 3)
	rec := record("00000000000000c1", "acme", base)
	if err := h[0].Insert(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if _, err := h[0].Revoke(ctx, "00000000000000ff", base); !errors.Is(err, proxy.ErrTokenNotFound) {
		t.Fatalf("Revoke of an unknown id: %v, want ErrTokenNotFound", err)
	}
	at := base.Add(time.Minute)
	info, err := h[1].Revoke(ctx, rec.ID, at)
	if err != nil {
		t.Fatal(err)
	}
	if info.Revoked == nil || !info.Revoked.Equal(at) || info.ID != rec.ID || info.Project != "acme" {
		t.Fatalf("Revoke = %+v", info)
	}
	// Seen by the next Get of every other handle.
	for i := range h {
		got, err := h[i].Get(ctx, rec.ID)
		if err != nil || got.Revoked == nil || !got.Revoked.Equal(at) {
			t.Fatalf("handle %d: Get after revocation = %+v, %v", i, got.TokenInfo, err)
		}
	}
	// A second revocation keeps the first time.
	info, err = h[2].Revoke(ctx, rec.ID, at.Add(time.Hour))
	if err != nil || info.Revoked == nil || !info.Revoked.Equal(at) {
		t.Fatalf("second Revoke = %+v, %v; want the first time kept", info, err)
	}
	if list, _ := h[0].List(ctx, "acme"); len(list) != 1 || list[0].Revoked == nil {
		t.Fatalf("List after revocation: %+v", list)
	}
}

func testConcurrentInserts(t *testing.T, open OpenTokens) {
	ctx := context.Background()
	const handles, each = 3, 10
	h := open(t, handles)
	var wg sync.WaitGroup
	errs := make(chan error, handles*each)
	for i := range handles {
		for n := range each {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("%08x%08x", i+1, n+1)
				if err := h[i].Insert(ctx, record(id, "acme", base.Add(time.Duration(n)*time.Second))); err != nil {
					errs <- err
				}
			}()
		}
	}
	// And every handle races for one id: exactly one wins.
	var won sync.WaitGroup
	wins := make(chan int, handles)
	for i := range handles {
		won.Add(1)
		go func() {
			defer won.Done()
			err := h[i].Insert(ctx, record("00000000000000dd", fmt.Sprint("p", i), base))
			switch {
			case err == nil:
				wins <- i
			case !errors.Is(err, proxy.ErrTokenIDTaken):
				errs <- err
			}
		}()
	}
	wg.Wait()
	won.Wait()
	close(errs)
	close(wins)
	for err := range errs {
		t.Fatal(err)
	}
	if n := len(wins); n != 1 {
		t.Fatalf("%d inserts of one id succeeded, want exactly 1", n)
	}
	list, err := h[0].List(ctx, "acme")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != handles*each {
		t.Fatalf("%d tokens listed, want %d: inserts were lost", len(list), handles*each)
	}
}

// testTokenStoreAcrossHandles: a token created through one replica works
// on another, and a revocation through any of them is refused by all at
// the next verification.
func testTokenStoreAcrossHandles(t *testing.T, open OpenTokens) {
	ctx := context.Background()
	h := open(t, 3)
	stores := make([]*proxy.TokenStore, len(h))
	for i, b := range h {
		s, err := proxy.NewTokenStore("", proxy.WithTokenBackend(b))
		if err != nil {
			t.Fatal(err)
		}
		stores[i] = s
	}
	tok, info, err := stores[0].Create(ctx, proxy.TokenSpec{Project: "acme", Scopes: []string{proxy.ScopePull}})
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range stores {
		if got, err := s.Verify(ctx, tok); err != nil || got.ID != info.ID {
			t.Fatalf("replica %d: Verify = %+v, %v", i, got, err)
		}
	}
	if _, err := stores[1].Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	for i, s := range stores {
		if _, err := s.Verify(ctx, tok); !errors.Is(err, proxy.ErrTokenRevoked) {
			t.Fatalf("replica %d: Verify after revocation elsewhere = %v, want ErrTokenRevoked", i, err)
		}
	}
}
