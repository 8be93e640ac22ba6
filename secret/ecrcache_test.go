package secret

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type cacheMaker func(t *testing.T, opts ...CacheOption) TokenCache

func diskCache(t *testing.T, dir string, opts ...CacheOption) *DiskTokenCache {
	t.Helper()
	keyPath := filepath.Join(dir, "key")
	if _, err := os.Stat(keyPath); err != nil {
		k, err := NewKeyring()
		if err != nil {
			t.Fatal(err)
		}
		if err := k.Save(keyPath); err != nil {
			t.Fatal(err)
		}
	}
	return NewDiskTokenCache(dir, func() (*Keyring, error) { return LoadKeyring(keyPath) }, opts...)
}

var cacheMakers = map[string]cacheMaker{
	"memory": func(t *testing.T, opts ...CacheOption) TokenCache { return NewMemoryTokenCache(opts...) },
	"disk":   func(t *testing.T, opts ...CacheOption) TokenCache { return diskCache(t, t.TempDir(), opts...) },
}

var testKey = TokenKey{ID: "0123abcd", Label: "default/prod (ECR registry 123456789012 in us-east-1)"}

// TestTokenCacheLifecycle walks one token through its life: cached, refreshed
// near expiry, served stale while a refresh fails, never served expired.
func TestTokenCacheLifecycle(t *testing.T) {
	t.Parallel()
	for name, mk := range cacheMakers {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			clk := newFakeClock()
			var logs syncBuffer
			c := mk(t, WithCacheClock(clk.now), WithCacheLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			ex := &countingExchanger{now: clk.now}
			fetch := func(ctx context.Context) (ECRToken, error) { return ex.Exchange(ctx, ECRRequest{}) }
			get := func() (ECRToken, error) { return c.Token(ctx, testKey, fetch) }
			step := func(what string, wantCalls int64, wantPw string, wantErr error) {
				t.Helper()
				tok, err := get()
				if wantErr != nil {
					if !errors.Is(err, wantErr) || tok.Password != "" {
						t.Fatalf("%s: got %q, %v; want error %v", what, tok.Password, err, wantErr)
					}
				} else if err != nil || tok.Password != wantPw {
					t.Fatalf("%s: got %q, %v; want %q", what, tok.Password, err, wantPw)
				}
				if n := ex.calls.Load(); n != wantCalls {
					t.Fatalf("%s: %d exchanges, want %d", what, n, wantCalls)
				}
			}
			step("cold", 1, canary+"-1", nil)
			step("warm", 1, canary+"-1", nil)
			clk.advance(10 * time.Hour)
			step("2h left", 1, canary+"-1", nil)
			clk.advance(time.Hour + time.Minute) // 59m left: inside the 1h margin
			step("near expiry", 2, canary+"-2", nil)
			step("refreshed", 2, canary+"-2", nil)

			clk.advance(11*time.Hour + 30*time.Minute) // 30m left
			ex.setErr(&ECRError{Kind: ErrAWSThrottled, Detail: "ECR GetAuthorizationToken: ThrottlingException"})
			step("refresh fails, old still valid", 3, canary+"-2", nil)
			if !strings.Contains(logs.String(), "ECR token refresh failed") || !strings.Contains(logs.String(), "ThrottlingException") ||
				!strings.Contains(logs.String(), testKey.Label) {
				t.Fatalf("no warning: %q", logs.String())
			}
			if strings.Contains(logs.String(), canary) {
				t.Fatalf("warning leaks the token: %q", logs.String())
			}
			// AWS is not asked again on every pull while it fails.
			clk.advance(10 * time.Second)
			step("within the retry pause", 3, canary+"-2", nil)
			clk.advance(25 * time.Second)
			step("after the retry pause", 4, canary+"-2", nil)
			clk.advance(28*time.Minute + 55*time.Second) // 30s left: too little to start a pull
			step("refresh fails, old about to expire", 5, "", ErrAWSThrottled)
			clk.advance(time.Minute) // expired
			step("refresh fails, old expired", 6, "", ErrAWSThrottled)
			ex.setErr(nil)
			step("recovered", 7, canary+"-7", nil)
		})
	}
}

// A token whose life is shorter than the margin is still reused for the
// first half of its life.
func TestTokenCacheShortLife(t *testing.T) {
	t.Parallel()
	for name, mk := range cacheMakers {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			c := mk(t, WithCacheClock(clk.now))
			ex := &countingExchanger{now: clk.now, life: 10 * time.Minute}
			fetch := func(ctx context.Context) (ECRToken, error) { return ex.Exchange(ctx, ECRRequest{}) }
			for _, adv := range []time.Duration{0, 4 * time.Minute, 0} {
				clk.advance(adv)
				if _, err := c.Token(context.Background(), testKey, fetch); err != nil {
					t.Fatal(err)
				}
			}
			if n := ex.calls.Load(); n != 1 {
				t.Fatalf("%d exchanges in the first half of the life, want 1", n)
			}
			clk.advance(2 * time.Minute)
			if _, err := c.Token(context.Background(), testKey, fetch); err != nil || ex.calls.Load() != 2 {
				t.Fatalf("past half life: %v, %d exchanges", err, ex.calls.Load())
			}
		})
	}
}

// A token that AWS hands out already expired is refused, not cached.
func TestTokenCacheRefusesExpiredFetch(t *testing.T) {
	t.Parallel()
	for name, mk := range cacheMakers {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := mk(t)
			_, err := c.Token(context.Background(), testKey, func(context.Context) (ECRToken, error) {
				return ECRToken{Password: canary, Expires: time.Now().Add(-time.Second)}, nil
			})
			if !errors.Is(err, ErrAWSFailed) {
				t.Fatalf("expired fetch: %v", err)
			}
		})
	}
}

func TestTokenCacheConcurrentOneFetch(t *testing.T) {
	t.Parallel()
	for name, mk := range map[string]func(t *testing.T, dir string) TokenCache{
		"memory": func(t *testing.T, _ string) TokenCache { return nil }, // one shared cache, below
		// A DiskTokenCache per goroutine, as each helper process has its
		// own: only the file lock makes them agree.
		"disk": func(t *testing.T, dir string) TokenCache { return diskCache(t, dir) },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			shared := NewMemoryTokenCache()
			ex := &countingExchanger{delay: 30 * time.Millisecond}
			var wg sync.WaitGroup
			pw := make([]string, 100)
			errs := make([]error, 100)
			diskCache(t, dir) // write the key once
			caches := make([]TokenCache, 100)
			for i := range caches {
				if caches[i] = mk(t, dir); caches[i] == nil {
					caches[i] = shared
				}
			}
			for i := range 100 {
				wg.Go(func() {
					c := caches[i]
					tok, err := c.Token(context.Background(), testKey, func(ctx context.Context) (ECRToken, error) { return ex.Exchange(ctx, ECRRequest{}) })
					pw[i], errs[i] = tok.Password, err
				})
			}
			wg.Wait()
			for i := range 100 {
				if errs[i] != nil || pw[i] != pw[0] || pw[i] == "" {
					t.Fatalf("caller %d: %q %v", i, pw[i], errs[i])
				}
			}
			if n := ex.calls.Load(); n != 1 {
				t.Fatalf("%d exchanges for 100 concurrent callers, want 1", n)
			}
		})
	}
}

// A caller that gives up does not cancel the exchange the others wait for.
func TestMemoryTokenCacheCallerGivesUp(t *testing.T) {
	t.Parallel()
	c := NewMemoryTokenCache()
	release := make(chan struct{})
	fetch := func(ctx context.Context) (ECRToken, error) {
		<-release
		if ctx.Err() != nil {
			return ECRToken{}, ctx.Err()
		}
		return ECRToken{Password: canary, Expires: time.Now().Add(time.Hour)}, nil
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := c.Token(context.Background(), testKey, fetch)
		done <- err
	}()
	if _, err := c.Token(short, testKey, fetch); !errors.Is(err, ErrAWSUnreachable) {
		t.Fatalf("impatient caller: %v", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("patient caller: %v", err)
	}
}

func TestDiskTokenCacheFile(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	c := diskCache(t, dir)
	ex := &countingExchanger{}
	fetch := func(ctx context.Context) (ECRToken, error) { return ex.Exchange(ctx, ECRRequest{}) }
	key := tokenKey(Secret{Project: "default", Name: "prod", Version: 1},
		ECRRequest{Registry: ECRRegistry{Service: ECRPrivate, Account: "123456789012", Region: "us-east-1"},
			AWS: AWSValue{AccessKeyID: awsKeyID, SecretAccessKey: awsCanary, RoleARN: "arn:aws:iam::123456789012:role/puller"}})
	tok, err := c.Token(ctx, key, fetch)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(c.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("cache file mode %v", fi.Mode())
	}
	b, _ := os.ReadFile(c.Path())
	for _, s := range []string{tok.Password, canary, awsKeyID, awsCanary, "123456789012", "us-east-1", "puller", "prod", key.ID} {
		if bytes.Contains(b, []byte(s)) {
			t.Fatalf("cache file holds %q in the clear:\n%s", s, b)
		}
	}
	// Another process (another cache value) reads the same token.
	if got, err := diskCache(t, dir).Token(ctx, key, fetch); err != nil || got.Password != tok.Password || ex.calls.Load() != 1 {
		t.Fatalf("second reader: %v, %d exchanges", err, ex.calls.Load())
	}
	// A damaged file is only a cold cache, and is replaced.
	if err := os.WriteFile(c.Path(), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Token(ctx, key, fetch); err != nil || got.Password == tok.Password || ex.calls.Load() != 2 {
		t.Fatalf("after damage: %v, %d exchanges", err, ex.calls.Load())
	}
	if got, err := c.Token(ctx, key, fetch); err != nil || ex.calls.Load() != 2 || got.Password == "" {
		t.Fatalf("damaged file not replaced: %v, %d exchanges", err, ex.calls.Load())
	}
	// A token sealed under another keyring does not open: it is a miss.
	other := t.TempDir()
	b, _ = os.ReadFile(c.Path())
	if err := os.WriteFile(filepath.Join(other, ecrCacheFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := diskCache(t, other).Token(ctx, key, fetch); err != nil || ex.calls.Load() != 3 {
		t.Fatalf("foreign keyring: %v, %d exchanges", err, ex.calls.Load())
	}
	// Expired entries are dropped when the file is next written.
	clk := newFakeClock()
	clk.t = time.Now().Add(13 * time.Hour)
	c2 := NewDiskTokenCache(dir, c.keyring, WithCacheClock(clk.now))
	other2 := TokenKey{ID: "other"}
	if _, err := c2.Token(ctx, other2, func(context.Context) (ECRToken, error) {
		return ECRToken{Password: "x", Expires: clk.now().Add(12 * time.Hour), Issued: clk.now()}, nil
	}); err != nil {
		t.Fatal(err)
	}
	if d := c2.read(); len(d.Tokens) != 1 {
		t.Fatalf("%d entries after expiry, want 1", len(d.Tokens))
	}
}

// Distinct secrets, identities and registries never share a token.
func TestTokenKeyDistinct(t *testing.T) {
	t.Parallel()
	sec := Secret{Project: "default", Name: "prod", Version: 1}
	reg := ECRRegistry{Service: ECRPrivate, Account: "123456789012", Region: "us-east-1"}
	base := ECRRequest{Registry: reg}
	variants := map[string]TokenKey{"base": tokenKey(sec, base)}
	add := func(name string, s Secret, r ECRRequest) {
		k := tokenKey(s, r)
		for n, v := range variants {
			if v.ID == k.ID {
				t.Fatalf("%s and %s share a key", name, n)
			}
		}
		variants[name] = k
	}
	s2 := sec
	s2.Project = "other"
	add("project", s2, base)
	s3 := sec
	s3.Version = 2
	add("version", s3, base)
	r := base
	r.Registry.Region = "us-west-2"
	add("region", sec, r)
	r = base
	r.Registry.Account = "210987654321"
	add("account", sec, r)
	r = base
	r.AWS.RoleARN = "arn:aws:iam::123456789012:role/a"
	add("role a", sec, r)
	r.AWS.RoleARN = "arn:aws:iam::123456789012:role/b"
	add("role b", sec, r)
	r = base
	r.AWS.AccessKeyID = awsKeyID
	add("keys", sec, r)
	r = base
	r.Registry.Service = ECRPublic
	add("public", sec, r)
	for _, k := range variants {
		if strings.Contains(k.ID, awsKeyID) || strings.Contains(k.Label, awsKeyID) {
			t.Fatal("key names the access key id")
		}
	}
}
