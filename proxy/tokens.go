package proxy

// Project tokens: the credentials clients of the proxy hold. A token is
//
//	pst_<id>_<secret>
//
// where id is 16 hex digits (64 random bits, the lookup key, safe to log
// and to show) and secret is 52 base32 characters (256 random bits). Only
// the SHA-256 of the whole token is stored; a token is found by its id and
// its hash compared in constant time. The token itself is shown once, when
// it is created.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pullsecret/pullsecret/internal/fsutil"
	"github.com/pullsecret/pullsecret/secret"
)

// Errors of project token operations. Their messages never hold a token.
var (
	// ErrInvalidToken means the credentials are not a valid project token
	// or registry token: malformed, unknown, or a wrong secret.
	ErrInvalidToken = errors.New("invalid credentials")
	// ErrTokenExpired means a project token (or a registry token issued
	// for it) has expired.
	ErrTokenExpired = errors.New("token expired")
	// ErrTokenRevoked means the project token was revoked.
	ErrTokenRevoked = errors.New("token revoked")
	// ErrTokenNotFound means no project token has the id.
	ErrTokenNotFound = errors.New("project token not found")
)

// Token store defaults.
const (
	// DefaultProjectTokenTTL is a project token's lifetime when none is
	// given.
	DefaultProjectTokenTTL = 30 * 24 * time.Hour
	// MaxProjectTokenTTL bounds a project token's lifetime: every token
	// expires.
	MaxProjectTokenTTL = 5 * 366 * 24 * time.Hour
	// TokenPrefix starts every project token.
	TokenPrefix = "pst_"

	tokensFile     = "tokens.json"
	tokensLock     = ".tokens.lock"
	tokensFormat   = 1
	tokenIDLen     = 16 // hex digits
	tokenSecretLen = 52 // base32 characters of 32 bytes
	tokenLen       = len(TokenPrefix) + tokenIDLen + 1 + tokenSecretLen
	maxTokenName   = 63
	maxTokenRepos  = 64
)

var tokenB32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// TokenInfo is a project token's metadata: everything but the token and
// its hash, so it can be listed, logged and printed.
type TokenInfo struct {
	ID      string `json:"id"`
	Name    string `json:"name,omitempty"`
	Project string `json:"project"`
	// Scopes are some of ScopePull, ScopePush, ScopeCredentials, in that
	// order; ScopePush always comes with ScopePull.
	Scopes []string `json:"scopes"`
	// Repositories are repository patterns (see ValidateRepositoryPattern);
	// empty means every repository of the project's upstreams.
	Repositories []string   `json:"repositories"`
	Created      time.Time  `json:"created"`
	Expires      time.Time  `json:"expires"`
	Revoked      *time.Time `json:"revoked"`
	// Ephemeral tokens (issued by the server itself, e.g. for kubelet) are
	// dropped from the store once expired.
	Ephemeral bool `json:"ephemeral,omitempty"`
}

// Status is "active", "expired" or "revoked" at now.
func (t TokenInfo) Status(now time.Time) string {
	switch {
	case t.Revoked != nil:
		return "revoked"
	case !now.Before(t.Expires):
		return "expired"
	}
	return "active"
}

// check returns ErrTokenRevoked or ErrTokenExpired when the token no
// longer works at now.
func (t TokenInfo) check(now time.Time) error {
	switch t.Status(now) {
	case "revoked":
		return ErrTokenRevoked
	case "expired":
		return ErrTokenExpired
	}
	return nil
}

func (t TokenInfo) clone() TokenInfo {
	t.Scopes = slices.Clone(t.Scopes)
	t.Repositories = slices.Clone(t.Repositories)
	if t.Revoked != nil {
		r := *t.Revoked
		t.Revoked = &r
	}
	return t
}

// TokenRecord is what a TokenBackend stores: the metadata and the SHA-256
// of the token.
type TokenRecord struct {
	TokenInfo
	Hash []byte `json:"sha256"`
}

// TokenBackend stores project token records. The default keeps them in a
// file in the data folder; a database can implement the same four methods.
// A backend never sees a token, only its hash.
type TokenBackend interface {
	// Insert adds a record whose id is new, or fails with an error
	// wrapping ErrTokenIDTaken.
	Insert(ctx context.Context, rec TokenRecord) error
	// Get returns the record with id, or an error wrapping
	// ErrTokenNotFound. A revocation made by any process must be seen by
	// the next Get.
	Get(ctx context.Context, id string) (TokenRecord, error)
	// List returns the metadata of project's tokens ("" for every
	// project), oldest first.
	List(ctx context.Context, project string) ([]TokenInfo, error)
	// Revoke marks id revoked at at (a second revocation keeps the first
	// time) and returns its metadata, or an error wrapping
	// ErrTokenNotFound.
	Revoke(ctx context.Context, id string, at time.Time) (TokenInfo, error)
}

// TokenStore creates, verifies, lists and revokes project tokens over a
// TokenBackend. It is safe for concurrent use.
type TokenStore struct {
	backend    TokenBackend
	now        func() time.Time
	defaultTTL time.Duration
	maxTTL     time.Duration
}

// TokenStoreOption configures NewTokenStore.
type TokenStoreOption func(*TokenStore)

// WithTokenBackend stores records in b instead of the data folder's file.
func WithTokenBackend(b TokenBackend) TokenStoreOption {
	return func(s *TokenStore) { s.backend = b }
}

// WithTokenClock sets the clock (tests).
func WithTokenClock(now func() time.Time) TokenStoreOption {
	return func(s *TokenStore) {
		if now != nil {
			s.now = now
		}
	}
}

// WithDefaultTokenTTL sets the lifetime of tokens created without one
// (default DefaultProjectTokenTTL).
func WithDefaultTokenTTL(d time.Duration) TokenStoreOption {
	return func(s *TokenStore) {
		if d > 0 {
			s.defaultTTL = d
		}
	}
}

// WithMaxTokenTTL bounds token lifetimes (default MaxProjectTokenTTL).
func WithMaxTokenTTL(d time.Duration) TokenStoreOption {
	return func(s *TokenStore) {
		if d > 0 {
			s.maxTTL = d
		}
	}
}

// NewTokenStore opens the project token store of the data folder home
// (file tokens.json, mode 0600), or of the backend WithTokenBackend names,
// in which case home may be "".
func NewTokenStore(home string, opts ...TokenStoreOption) (*TokenStore, error) {
	s := &TokenStore{now: time.Now, defaultTTL: DefaultProjectTokenTTL, maxTTL: MaxProjectTokenTTL}
	for _, o := range opts {
		o(s)
	}
	if s.backend == nil {
		b, err := NewFileTokenBackend(home, s.now)
		if err != nil {
			return nil, err
		}
		s.backend = b
	}
	if s.defaultTTL > s.maxTTL {
		s.defaultTTL = s.maxTTL
	}
	return s, nil
}

// TokenSpec says what token to create.
type TokenSpec struct {
	Project string
	Name    string // optional label
	// Scopes default to ScopePull.
	Scopes []string
	// Repositories are repository patterns; none means every repository
	// of the project's upstreams.
	Repositories []string
	// TTL defaults to the store's default.
	TTL time.Duration
	// Ephemeral tokens are dropped from the store once expired.
	Ephemeral bool
}

// Create makes a new token and returns it with its metadata. The token is
// not kept anywhere: the caller shows it once.
func (s *TokenStore) Create(ctx context.Context, spec TokenSpec) (string, TokenInfo, error) {
	info, err := s.normalize(spec)
	if err != nil {
		return "", TokenInfo{}, err
	}
	for range 3 {
		tok, id, err := newToken()
		if err != nil {
			return "", TokenInfo{}, err
		}
		info.ID = id
		sum := sha256.Sum256([]byte(tok))
		err = s.backend.Insert(ctx, TokenRecord{TokenInfo: info, Hash: sum[:]})
		if errors.Is(err, ErrTokenIDTaken) {
			continue // 64 random bits: practically never
		}
		if err != nil {
			return "", TokenInfo{}, err
		}
		return tok, info.clone(), nil
	}
	return "", TokenInfo{}, errors.New("create project token: could not pick a free id")
}

// IssuePullToken creates a short-lived, ephemeral pull token for project,
// limited to repository ("<upstream>/<repo>") unless it is "". It is the
// PullTokenIssuer the kubelet API uses for images on the proxy.
func (s *TokenStore) IssuePullToken(ctx context.Context, project, repository string, ttl time.Duration) (string, time.Time, error) {
	spec := TokenSpec{Project: project, Name: "issued-pull", Scopes: []string{ScopePull}, TTL: ttl, Ephemeral: true}
	if repository != "" {
		spec.Repositories = []string{repository}
	}
	tok, info, err := s.Create(ctx, spec)
	if err != nil {
		return "", time.Time{}, err
	}
	return tok, info.Expires, nil
}

func (s *TokenStore) normalize(spec TokenSpec) (TokenInfo, error) {
	if spec.Project == "" {
		spec.Project = secret.DefaultProject
	}
	if err := secret.ValidName(spec.Project); err != nil {
		return TokenInfo{}, fmt.Errorf("project: %w", err)
	}
	if err := validTokenName(spec.Name); err != nil {
		return TokenInfo{}, err
	}
	scopes, err := NormalizeScopes(spec.Scopes)
	if err != nil {
		return TokenInfo{}, err
	}
	if len(spec.Repositories) > maxTokenRepos {
		return TokenInfo{}, fmt.Errorf("at most %d repository patterns", maxTokenRepos)
	}
	var repos []string
	for _, p := range spec.Repositories {
		np, err := ValidateRepositoryPattern(p)
		if err != nil {
			return TokenInfo{}, err
		}
		if !slices.Contains(repos, np) {
			repos = append(repos, np)
		}
	}
	ttl := spec.TTL
	if ttl == 0 {
		ttl = s.defaultTTL
	}
	if ttl < 0 {
		return TokenInfo{}, errors.New("token lifetime must be positive")
	}
	if ttl > s.maxTTL {
		return TokenInfo{}, fmt.Errorf("token lifetime %s is longer than the maximum %s", ttl, s.maxTTL)
	}
	now := s.now().UTC().Truncate(time.Second)
	return TokenInfo{
		Name: spec.Name, Project: spec.Project, Scopes: scopes, Repositories: repos,
		Created: now, Expires: now.Add(ttl), Ephemeral: spec.Ephemeral,
	}, nil
}

func validTokenName(n string) error {
	if n == "" {
		return nil
	}
	ok := len(n) <= maxTokenName
	for i := 0; ok && i < len(n); i++ {
		c := n[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		ok = alnum || i > 0 && (c == '.' || c == '_' || c == '-')
	}
	if !ok {
		return fmt.Errorf("invalid token name %q: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most %d characters", tokPrintable(n), maxTokenName)
	}
	return nil
}

// NormalizeScopes checks scopes and puts them in canonical order: pull,
// push, credentials. None means pull; push brings pull with it.
func NormalizeScopes(scopes []string) ([]string, error) {
	if len(scopes) == 0 {
		return []string{ScopePull}, nil
	}
	seen := map[string]bool{}
	for _, sc := range scopes {
		for _, part := range strings.Split(sc, ",") {
			part = strings.TrimSpace(part)
			switch part {
			case ScopePull, ScopePush, ScopeCredentials:
				seen[part] = true
			default:
				return nil, fmt.Errorf("unknown scope %q (want %s, %s or %s)", tokPrintable(part), ScopePull, ScopePush, ScopeCredentials)
			}
		}
	}
	if seen[ScopePush] {
		seen[ScopePull] = true
	}
	var out []string
	for _, sc := range []string{ScopePull, ScopePush, ScopeCredentials} {
		if seen[sc] {
			out = append(out, sc)
		}
	}
	return out, nil
}

// ValidateRepositoryPattern checks a project token's repository pattern
// and returns its canonical form. Patterns name repositories as the proxy
// does, upstream host first:
//
//	ghcr.io               every repository on ghcr.io
//	ghcr.io/acme          ghcr.io/acme and every repository below it
//	                      (ghcr.io/acme/app, ghcr.io/acme/team/app), but
//	                      not ghcr.io/acme-other
//	ghcr.io/acme/*        only the repositories below ghcr.io/acme, not
//	                      ghcr.io/acme itself
//
// Hosts are lower-cased and Docker Hub's aliases fold into docker.io. "*"
// is allowed only as the whole last path component.
func ValidateRepositoryPattern(p string) (string, error) {
	orig := p
	wild := false
	if strings.HasSuffix(p, "/*") {
		wild, p = true, strings.TrimSuffix(p, "/*")
	}
	if strings.Contains(p, "*") || strings.Contains(p, "://") || strings.ContainsAny(p, "?#@") || p == "" {
		return "", fmt.Errorf("invalid repository pattern %q: want HOST[:PORT][/PATH][/*]", tokPrintable(orig))
	}
	t, err := secret.ParseServerURL(p)
	if err != nil {
		return "", fmt.Errorf("invalid repository pattern %q: %v", tokPrintable(orig), err)
	}
	if _, path, _ := strings.Cut(p, "/"); strings.Trim(path, "/") != t.Repo {
		return "", fmt.Errorf("invalid repository pattern %q: want HOST[:PORT][/PATH][/*]", tokPrintable(orig))
	}
	out := t.String()
	if wild && t.Repo != "" {
		out += "/*"
	}
	return out, nil
}

// repositoryTarget splits a repository name "<upstream>/<repo>" as the
// proxy names repositories. The path must be a valid repository path, kept
// as it is (the upstream host is canonicalised).
func repositoryTarget(name string) (secret.Target, bool) {
	if name == "" || len(name) > 512 || strings.Contains(name, "://") || strings.ContainsAny(name, "?#@* ") {
		return secret.Target{}, false
	}
	_, path, ok := strings.Cut(name, "/")
	if !ok {
		return secret.Target{}, false
	}
	t, err := secret.ParseServerURL(name)
	if err != nil || t.Repo == "" || t.Repo != path {
		return secret.Target{}, false
	}
	return t, true
}

// MatchRepositoryPattern reports whether the canonical pattern p (see
// ValidateRepositoryPattern) covers repository name ("<upstream>/<repo>").
func MatchRepositoryPattern(p, name string) bool {
	t, ok := repositoryTarget(name)
	if !ok {
		return false
	}
	return matchPattern(p, t)
}

func matchPattern(p string, t secret.Target) bool {
	wild := strings.HasSuffix(p, "/*")
	p = strings.TrimSuffix(p, "/*")
	host, prefix, _ := strings.Cut(p, "/")
	if host != t.Host {
		return false
	}
	switch {
	case prefix == "":
		return true
	case wild:
		return strings.HasPrefix(t.Repo, prefix+"/")
	default:
		return t.Repo == prefix || strings.HasPrefix(t.Repo, prefix+"/")
	}
}

// reposAllow reports whether a token's patterns cover t; no patterns cover
// everything.
func reposAllow(patterns []string, t secret.Target) bool {
	if len(patterns) == 0 {
		return true
	}
	for _, p := range patterns {
		if matchPattern(p, t) {
			return true
		}
	}
	return false
}

// newToken returns a fresh token and its id.
func newToken() (tok, id string, err error) {
	var b [8 + 32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", fmt.Errorf("create project token: %w", err)
	}
	id = hex.EncodeToString(b[:8])
	return TokenPrefix + id + "_" + tokenB32.EncodeToString(b[8:]), id, nil
}

// ParseTokenID returns the id of a well-formed project token.
func ParseTokenID(tok string) (string, bool) {
	if len(tok) != tokenLen || !strings.HasPrefix(tok, TokenPrefix) {
		return "", false
	}
	id, sec := tok[len(TokenPrefix):len(TokenPrefix)+tokenIDLen], tok[len(TokenPrefix)+tokenIDLen:]
	if !validTokenID(id) || sec[0] != '_' {
		return "", false
	}
	for i := 1; i < len(sec); i++ {
		c := sec[i]
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return "", false
		}
	}
	return id, true
}

func validTokenID(id string) bool {
	if len(id) != tokenIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// looksLikeProjectToken tells a project token from a JWT without checking
// it.
func looksLikeProjectToken(s string) bool { return strings.HasPrefix(s, TokenPrefix) }

// Verify checks a project token: well-formed, known, hash equal (in
// constant time), not revoked, not expired. Errors are ErrInvalidToken,
// ErrTokenRevoked or ErrTokenExpired (revocation and expiry are told only
// to holders of the real token).
func (s *TokenStore) Verify(ctx context.Context, tok string) (TokenInfo, error) {
	info, _, err := s.verify(ctx, tok)
	return info, err
}

// verify is Verify that also says whether the id was known, which decides
// how failures are rate limited.
func (s *TokenStore) verify(ctx context.Context, tok string) (info TokenInfo, knownID bool, err error) {
	sum := sha256.Sum256([]byte(tok))
	id, ok := ParseTokenID(tok)
	if !ok {
		return TokenInfo{}, false, ErrInvalidToken
	}
	rec, err := s.backend.Get(ctx, id)
	if errors.Is(err, ErrTokenNotFound) {
		return TokenInfo{}, false, ErrInvalidToken
	}
	if err != nil {
		return TokenInfo{}, false, err
	}
	if !hashEqual(sum[:], rec.Hash) {
		return TokenInfo{}, true, ErrInvalidToken
	}
	if err := rec.check(s.now()); err != nil {
		return TokenInfo{}, true, err
	}
	return rec.TokenInfo.clone(), true, nil
}

// hashEqual compares two token hashes in constant time.
func hashEqual(a, b []byte) bool {
	return len(b) == sha256.Size && subtle.ConstantTimeCompare(a, b) == 1
}

// Get returns a token's metadata (ErrTokenNotFound when the id is
// unknown), whatever its status.
func (s *TokenStore) Get(ctx context.Context, id string) (TokenInfo, error) {
	if !validTokenID(id) {
		return TokenInfo{}, fmt.Errorf("token %q: %w", tokPrintable(id), ErrTokenNotFound)
	}
	rec, err := s.backend.Get(ctx, id)
	if err != nil {
		return TokenInfo{}, err
	}
	return rec.TokenInfo.clone(), nil
}

// active returns a token's metadata if it still works.
func (s *TokenStore) active(ctx context.Context, id string) (TokenInfo, error) {
	info, err := s.Get(ctx, id)
	if errors.Is(err, ErrTokenNotFound) {
		return TokenInfo{}, ErrInvalidToken
	}
	if err != nil {
		return TokenInfo{}, err
	}
	if err := info.check(s.now()); err != nil {
		return TokenInfo{}, err
	}
	return info, nil
}

// List returns the metadata of project's tokens ("" for every project).
func (s *TokenStore) List(ctx context.Context, project string) ([]TokenInfo, error) {
	return s.backend.List(ctx, project)
}

// Revoke revokes the token id: it stops working at once, and so do the
// registry tokens issued for it.
func (s *TokenStore) Revoke(ctx context.Context, id string) (TokenInfo, error) {
	if !validTokenID(id) {
		return TokenInfo{}, fmt.Errorf("token %q: %w", tokPrintable(id), ErrTokenNotFound)
	}
	return s.backend.Revoke(ctx, id, s.now().UTC().Truncate(time.Second))
}

// Now is the store's clock.
func (s *TokenStore) Now() time.Time { return s.now() }

// ErrTokenIDTaken is what TokenBackend.Insert returns (wrapped or not) for
// an id already stored: Create then picks another id.
var ErrTokenIDTaken = errors.New("token id taken")

// FileTokenBackend keeps token records in tokens.json in the data folder:
// mode 0600, replaced atomically on every write, writers serialised by a
// file lock. Readers re-read the file whenever it changed (checked with one
// fstat per lookup), so a revocation by `pullsecret token revoke` is seen by
// a running server at its next request.
type FileTokenBackend struct {
	path, lock string
	now        func() time.Time

	mu     sync.Mutex
	stamp  tokFileStamp
	cached *tokenDoc
}

type tokenDoc struct {
	Format int           `json:"format"`
	Tokens []TokenRecord `json:"tokens"`
}

// tokFileStamp identifies one version of a file: every write is a rename of a
// new file, so the inode alone changes each time; size and mtime are
// checked too.
type tokFileStamp struct {
	dev, ino uint64
	size     int64
	mtime    int64
	exists   bool
}

var _ TokenBackend = (*FileTokenBackend)(nil)

// NewFileTokenBackend opens the token file of the data folder home.
func NewFileTokenBackend(home string, now func() time.Time) (*FileTokenBackend, error) {
	if home == "" {
		return nil, errors.New("open token store: no home folder")
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("open token store: %w", err)
	}
	if now == nil {
		now = time.Now
	}
	return &FileTokenBackend{path: filepath.Join(home, tokensFile), lock: filepath.Join(home, tokensLock), now: now}, nil
}

// Path is the token file.
func (b *FileTokenBackend) Path() string { return b.path }

func tokStampOf(fi fs.FileInfo) tokFileStamp {
	st := tokFileStamp{size: fi.Size(), mtime: fi.ModTime().UnixNano(), exists: true}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.dev, st.ino = uint64(sys.Dev), sys.Ino
	}
	return st
}

// load returns the current document, re-reading the file only when it
// changed (one stat per call otherwise). The result is shared: callers
// must not modify it.
func (b *FileTokenBackend) load() (*tokenDoc, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	fi, err := os.Stat(b.path)
	if errors.Is(err, fs.ErrNotExist) {
		if b.cached == nil || b.stamp.exists {
			b.cached, b.stamp = &tokenDoc{Format: tokensFormat}, tokFileStamp{}
		}
		return b.cached, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read token store: %w", err)
	}
	if b.cached != nil && tokStampOf(fi) == b.stamp {
		return b.cached, nil
	}
	f, err := os.Open(b.path)
	if err != nil {
		return nil, fmt.Errorf("read token store: %w", err)
	}
	defer f.Close()
	// The stamp of what is read, not of what was stat'ed: if the file was
	// replaced in between, the next call reads it again.
	if fi, err = f.Stat(); err != nil {
		return nil, fmt.Errorf("read token store: %w", err)
	}
	data, err := io.ReadAll(io.LimitReader(f, 256<<20))
	if err != nil {
		return nil, fmt.Errorf("read token store: %w", err)
	}
	var d tokenDoc
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("token store file %s is damaged (%v); it was left as it is", b.path, err)
	}
	if d.Format != tokensFormat {
		return nil, fmt.Errorf("token store file %s: format %d, this version reads %d", b.path, d.Format, tokensFormat)
	}
	b.cached, b.stamp = &d, tokStampOf(fi)
	return &d, nil
}

// update runs fn on a private copy of the document under the writers'
// lock and saves what it leaves.
func (b *FileTokenBackend) update(fn func(d *tokenDoc) error) error {
	unlock, err := fsutil.Lock(b.lock)
	if err != nil {
		return err
	}
	defer unlock()
	cur, err := b.load()
	if err != nil {
		return err
	}
	d := &tokenDoc{Format: tokensFormat, Tokens: slices.Clone(cur.Tokens)}
	if err := fn(d); err != nil {
		return err
	}
	// Ephemeral tokens are useless once expired: drop them.
	now := b.now()
	d.Tokens = slices.DeleteFunc(d.Tokens, func(r TokenRecord) bool { return r.Ephemeral && !now.Before(r.Expires) })
	var buf strings.Builder
	fmt.Fprintf(&buf, "{\"format\":%d,\"tokens\":[", d.Format)
	for i, r := range d.Tokens {
		line, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.WriteString("\n")
		buf.Write(line)
	}
	buf.WriteString("\n]}\n")
	return fsutil.WriteFileAtomic(b.path, []byte(buf.String()))
}

func findToken(d *tokenDoc, id string) int {
	return slices.IndexFunc(d.Tokens, func(r TokenRecord) bool { return r.ID == id })
}

// Insert implements TokenBackend.
func (b *FileTokenBackend) Insert(_ context.Context, rec TokenRecord) error {
	return b.update(func(d *tokenDoc) error {
		if findToken(d, rec.ID) >= 0 {
			return ErrTokenIDTaken
		}
		d.Tokens = append(d.Tokens, rec)
		return nil
	})
}

// Get implements TokenBackend.
func (b *FileTokenBackend) Get(_ context.Context, id string) (TokenRecord, error) {
	d, err := b.load()
	if err != nil {
		return TokenRecord{}, err
	}
	i := findToken(d, id)
	if i < 0 {
		return TokenRecord{}, fmt.Errorf("token %s: %w", id, ErrTokenNotFound)
	}
	r := d.Tokens[i]
	r.TokenInfo = r.TokenInfo.clone()
	r.Hash = slices.Clone(r.Hash) // the document is shared by every reader
	return r, nil
}

// List implements TokenBackend.
func (b *FileTokenBackend) List(_ context.Context, project string) ([]TokenInfo, error) {
	d, err := b.load()
	if err != nil {
		return nil, err
	}
	out := []TokenInfo{}
	for _, r := range d.Tokens {
		if project == "" || r.Project == project {
			out = append(out, r.TokenInfo.clone())
		}
	}
	slices.SortStableFunc(out, func(a, b TokenInfo) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// Revoke implements TokenBackend.
func (b *FileTokenBackend) Revoke(_ context.Context, id string, at time.Time) (TokenInfo, error) {
	var out TokenInfo
	err := b.update(func(d *tokenDoc) error {
		i := findToken(d, id)
		if i < 0 {
			return fmt.Errorf("token %s: %w", id, ErrTokenNotFound)
		}
		r := d.Tokens[i]
		r.TokenInfo = r.TokenInfo.clone()
		if r.Revoked == nil {
			r.Revoked = &at
		}
		d.Tokens[i] = r
		out = r.TokenInfo.clone()
		return nil
	})
	return out, err
}

// tokPrintable keeps user input in a message readable and short.
func tokPrintable(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return s
}
