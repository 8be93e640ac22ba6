package secret

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/singleflight"
)

// DefaultRefreshMargin is how much of a token's life must be left for it to
// be used without a refresh. ECR tokens live 12 hours.
const DefaultRefreshMargin = time.Hour

// fetchTimeout bounds one exchange started on behalf of callers who may
// give up: it runs detached from any one caller, so that the others still
// get its result.
const fetchTimeout = 30 * time.Second

// TokenKey names a cached token. ID is a hash (see tokenKey); Label names the
// secret and registry in log lines and holds nothing secret.
type TokenKey struct {
	ID    string
	Label string
}

// TokenCache holds ECR tokens between pulls. Token returns a fresh cached
// token for key or calls fetch for a new one. When fetch fails while the
// cached token is still valid, Token logs a warning and returns the cached
// token; an expired token is never returned.
type TokenCache interface {
	Token(ctx context.Context, key TokenKey, fetch func(context.Context) (ECRToken, error)) (ECRToken, error)
}

// CacheOption configures a token cache.
type CacheOption func(*cachePolicy)

// WithRefreshMargin refreshes a token when less than d of its life is left
// (default DefaultRefreshMargin). The margin is capped at half the token's
// life, so a short-lived token is still reused.
func WithRefreshMargin(d time.Duration) CacheOption {
	return func(p *cachePolicy) {
		if d > 0 {
			p.margin = d
		}
	}
}

// WithCacheClock sets the cache's clock.
func WithCacheClock(now func() time.Time) CacheOption { return func(p *cachePolicy) { p.now = now } }

// WithCacheLogger logs the warning of a failed refresh to l.
func WithCacheLogger(l *slog.Logger) CacheOption {
	return func(p *cachePolicy) {
		if l != nil {
			p.log = l
		}
	}
}

type cachePolicy struct {
	margin time.Duration
	now    func() time.Time
	log    *slog.Logger
}

func newPolicy(opts []CacheOption) cachePolicy {
	p := cachePolicy{margin: DefaultRefreshMargin, now: time.Now, log: discardLogger}
	for _, o := range opts {
		o(&p)
	}
	return p
}

func life(t ECRToken) time.Duration {
	if t.Issued.IsZero() || !t.Issued.Before(t.Expires) {
		return 12 * time.Hour
	}
	return t.Expires.Sub(t.Issued)
}

// fresh reports whether t needs no refresh yet.
func (p cachePolicy) fresh(t ECRToken) bool {
	return t.Expires.Sub(p.now()) > min(p.margin, life(t)/2)
}

// usable reports whether t may still be handed out: it must outlive a pull
// that starts now by a little (a minute, or a tenth of a short life).
func (p cachePolicy) usable(t ECRToken) bool {
	if t.Password == "" {
		return false
	}
	return t.Expires.Sub(p.now()) > min(time.Minute, life(t)/10)
}

// cached is a token as a cache holds it. After a failed refresh the token
// is served as it is, without asking AWS again, until retryAfter: an AWS
// outage or throttling is not made worse by a call per pull.
type cached struct {
	tok        ECRToken
	retryAfter time.Time
}

// serve reports whether c may be handed out without asking AWS.
func (p cachePolicy) serve(c cached) bool {
	return p.fresh(c.tok) || p.usable(c.tok) && p.now().Before(c.retryAfter)
}

// fetchOrStale calls fetch and, if it fails while old is usable, warns and
// returns old with the time to try again. fetched says whether the token
// is new.
func (p cachePolicy) fetchOrStale(ctx context.Context, key TokenKey, old cached, haveOld bool,
	fetch func(context.Context) (ECRToken, error)) (c cached, fetched bool, err error) {
	issued := p.now()
	tok, err := fetch(ctx)
	if err == nil {
		if tok.Issued.IsZero() {
			tok.Issued = issued
		}
		if !p.usable(tok) {
			return cached{}, false, &ECRError{Kind: ErrAWSFailed, Detail: fmt.Sprintf("AWS returned a token that expires at %s, too soon to use", tok.Expires.UTC().Format(time.RFC3339))}
		}
		return cached{tok: tok}, true, nil
	}
	if haveOld && p.usable(old.tok) {
		p.log.Warn("ECR token refresh failed; using the cached token until it expires",
			"secret", key.Label, "expires", old.tok.Expires.UTC().Format(time.RFC3339), "error", err.Error())
		old.retryAfter = p.now().Add(min(30*time.Second, life(old.tok)/40))
		return old, false, nil
	}
	return cached{}, false, err
}

// MemoryTokenCache is the server's token cache: tokens live in memory, and
// concurrent requests for one key share a single exchange.
type MemoryTokenCache struct {
	policy cachePolicy
	mu     sync.Mutex
	tokens map[string]cached
	group  singleflight.Group
}

// NewMemoryTokenCache returns an empty in-memory cache.
func NewMemoryTokenCache(opts ...CacheOption) *MemoryTokenCache {
	return &MemoryTokenCache{policy: newPolicy(opts), tokens: map[string]cached{}}
}

func (c *MemoryTokenCache) get(id string) (cached, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.tokens[id]
	return t, ok
}

// Token implements TokenCache.
func (c *MemoryTokenCache) Token(ctx context.Context, key TokenKey, fetch func(context.Context) (ECRToken, error)) (ECRToken, error) {
	if e, ok := c.get(key.ID); ok && c.policy.serve(e) {
		return e.tok, nil
	}
	ch := c.group.DoChan(key.ID, func() (any, error) {
		old, ok := c.get(key.ID)
		if ok && c.policy.serve(old) {
			return old.tok, nil
		}
		// The exchange outlives a caller who gives up: the others wait for it.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		e, _, err := c.policy.fetchOrStale(fctx, key, old, ok, fetch)
		if err != nil {
			return ECRToken{}, err
		}
		c.mu.Lock()
		for id, t := range c.tokens {
			if !c.policy.usable(t.tok) {
				delete(c.tokens, id)
			}
		}
		c.tokens[key.ID] = e
		c.mu.Unlock()
		return e.tok, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return ECRToken{}, r.Err
		}
		return r.Val.(ECRToken), nil
	case <-ctx.Done():
		return ECRToken{}, &ECRError{Kind: ErrAWSUnreachable, Detail: "gave up waiting for the ECR token: " + ctx.Err().Error()}
	}
}

// Files of the disk cache inside the home folder.
const (
	ecrCacheFile = "ecr-tokens.json"
	ecrLockFile  = ".ecr-tokens.lock"
)

const ecrCacheFormat = 1

// DiskTokenCache is the credential helper's token cache: one file in the
// home folder, 0600, each token sealed with the store's keyring under a key
// that is an HMAC of the token's identity, so the file names no account,
// role or key id and holds no password in the clear. Processes serialise
// on a file lock around "check, fetch, write": however many helpers start
// at once on a cold cache, one asks AWS and the others read its answer.
type DiskTokenCache struct {
	policy  cachePolicy
	dir     string
	keyring func() (*Keyring, error)
}

// NewDiskTokenCache keeps tokens in dir, sealed with the keyring keyring
// returns.
func NewDiskTokenCache(dir string, keyring func() (*Keyring, error), opts ...CacheOption) *DiskTokenCache {
	return &DiskTokenCache{policy: newPolicy(opts), dir: dir, keyring: keyring}
}

// WithDiskCachedECR registers an ECR provider that exchanges through ex and keeps its
// tokens in a DiskTokenCache in the store's home folder, sealed with the
// store's keyring.
func WithDiskCachedECR(ex ECRExchanger, opts ...CacheOption) Option {
	return func(s *Store) {
		c := NewDiskTokenCache(s.home, func() (*Keyring, error) { return s.keyring(false) }, opts...)
		s.providers[ECR] = NewECRProvider(ex, WithTokenCache(c))
	}
}

// Path is the cache file.
func (c *DiskTokenCache) Path() string { return filepath.Join(c.dir, ecrCacheFile) }

type diskEntry struct {
	// Expires is in the clear so that expired entries can be dropped
	// without opening them; it says nothing about whose token it was.
	Expires time.Time `json:"expires"`
	// RetryAfter is set after a failed refresh (see cached).
	RetryAfter time.Time `json:"retry_after,omitzero"`
	Sealed     Sealed    `json:"sealed"`
}

type diskDoc struct {
	Format int                  `json:"format"`
	Tokens map[string]diskEntry `json:"tokens"`
}

// slot is the entry name for key under keyring k: an HMAC of the key's ID
// under a key derived from the keyring's current key.
func slot(k *Keyring, id string) (string, error) {
	key, ok := k.key(k.Current)
	if !ok {
		return "", fmt.Errorf("current key %q missing", k.Current)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte("pullsecret/ecr-cache-slot/v1\x00"))
	m.Write([]byte(id))
	return hex.EncodeToString(m.Sum(nil)), nil
}

func slotAAD(slot string) []byte { return []byte("pullsecret/ecr-token/v1\x00" + slot) }

// read loads the cache file; a missing or damaged one is empty (it is only
// a cache, and the next write replaces it).
func (c *DiskTokenCache) read() *diskDoc {
	d := &diskDoc{Format: ecrCacheFormat, Tokens: map[string]diskEntry{}}
	b, err := os.ReadFile(c.Path())
	if err != nil {
		return d
	}
	var got diskDoc
	if json.Unmarshal(b, &got) != nil || got.Format != ecrCacheFormat || got.Tokens == nil {
		return d
	}
	return &got
}

func (c *DiskTokenCache) lookup(d *diskDoc, k *Keyring, slot string) (cached, bool) {
	e, ok := d.Tokens[slot]
	if !ok {
		return cached{}, false
	}
	var t ECRToken
	if k.OpenJSON(e.Sealed, slotAAD(slot), &t) != nil {
		return cached{}, false
	}
	return cached{tok: t, retryAfter: e.RetryAfter}, true
}

func (c *DiskTokenCache) write(d *diskDoc) error {
	now := c.policy.now()
	for s, e := range d.Tokens {
		if !e.Expires.After(now) {
			delete(d.Tokens, s)
		}
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(d); err != nil {
		return err
	}
	return writeCacheFile(c.Path(), buf.Bytes())
}

// writeCacheFile replaces path atomically, like writeFileAtomic, without
// the fsyncs: after a crash the cache may be empty or damaged, which only
// costs one exchange (read treats it as empty), and a helper that fetched
// a token should not wait for the disk.
func writeCacheFile(path string, data []byte) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(0o600); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// Token implements TokenCache.
func (c *DiskTokenCache) Token(ctx context.Context, key TokenKey, fetch func(context.Context) (ECRToken, error)) (ECRToken, error) {
	k, err := c.keyring()
	if err != nil {
		return ECRToken{}, fmt.Errorf("ECR token cache: %w", err)
	}
	s, err := slot(k, key.ID)
	if err != nil {
		return ECRToken{}, fmt.Errorf("ECR token cache: %w", err)
	}
	// The fast path reads without the lock: writers replace the file
	// atomically.
	if e, ok := c.lookup(c.read(), k, s); ok && c.policy.serve(e) {
		return e.tok, nil
	}
	if err := ensureDir(c.dir); err != nil {
		return ECRToken{}, fmt.Errorf("ECR token cache: %w", err)
	}
	unlock, err := lockFileCtx(ctx, filepath.Join(c.dir, ecrLockFile))
	if err != nil {
		return ECRToken{}, fmt.Errorf("ECR token cache: %w", err)
	}
	defer unlock()
	// Only a lock holder writes temporary files: any found now are a dead
	// writer's.
	if stale, _ := filepath.Glob(filepath.Join(c.dir, "."+ecrCacheFile+".tmp-*")); len(stale) > 0 {
		for _, f := range stale {
			os.Remove(f)
		}
	}
	d := c.read()
	old, ok := c.lookup(d, k, s)
	if ok && c.policy.serve(old) {
		return old.tok, nil // another process refreshed it while we waited
	}
	e, fetched, err := c.policy.fetchOrStale(ctx, key, old, ok, fetch)
	if err != nil {
		return ECRToken{}, err
	}
	entry := d.Tokens[s]
	if fetched {
		sealed, err := k.SealJSON(e.tok, slotAAD(s))
		if err != nil {
			return ECRToken{}, fmt.Errorf("ECR token cache: %w", err)
		}
		entry = diskEntry{Expires: e.tok.Expires.UTC(), Sealed: sealed}
	}
	entry.RetryAfter = e.retryAfter.UTC()
	d.Tokens[s] = entry
	if err := c.write(d); err != nil {
		// The token is good; only the next process pays for the failure.
		c.policy.log.Warn("ECR token cache not saved", "path", c.Path(), "error", err.Error())
	}
	return e.tok, nil
}

// lockFileCtx is lockFile that gives up when ctx is done. It polls, since a
// blocked flock cannot be interrupted; the holder is one helper doing one
// bounded exchange.
func lockFileCtx(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	wait := time.Millisecond
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(wait*2, 10*time.Millisecond)
	}
}
