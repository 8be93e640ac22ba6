package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"
)

// AccessKey names what an access record is about: a project's own
// credential was accepted by an upstream for a repository.
type AccessKey struct {
	Project  string
	Upstream string // host[:port], compared case-insensitively
	Repo     string
}

func (k AccessKey) norm() AccessKey {
	k.Upstream = normHost(k.Upstream)
	return k
}

// AccessRecords remember when each project last proved, with its own
// credential, that an upstream grants it a repository (DESIGN.md invariant
// 2, the idea of KEP-2535). The proxy serves cached content of upstream/repo
// to a project only while its record is valid; otherwise it proves access
// upstream first. It is small on purpose: a PostgreSQL table
// (project, upstream, repo, at) implements it as well.
type AccessRecords interface {
	// Record notes that k's project proved access at time at (a record
	// only moves forward in time).
	Record(ctx context.Context, k AccessKey, at time.Time) error
	// Valid reports whether k's project proved access less than ttl ago.
	Valid(ctx context.Context, k AccessKey, ttl time.Duration) (bool, error)
	// Last returns when k's project last proved access, if ever (for a
	// policy that tolerates an upstream outage: see the package doc).
	Last(ctx context.Context, k AccessKey) (time.Time, bool, error)
	// Revoke forgets k at once: the upstream has just refused the
	// project's credential (401/403).
	Revoke(ctx context.Context, k AccessKey) error
}

// Defaults of MemoryAccessRecords.
const (
	DefaultAccessRetention  = 24 * time.Hour
	DefaultAccessFlushDelay = time.Second
)

// AccessOption configures NewAccessRecords and OpenAccessRecords.
type AccessOption func(*MemoryAccessRecords)

// AccessClock sets the clock (default time.Now).
func AccessClock(now func() time.Time) AccessOption {
	return func(m *MemoryAccessRecords) { m.now = now }
}

// AccessRetention drops records older than d (default 24h) when the file
// is written or read: they are past any sensible access TTL.
func AccessRetention(d time.Duration) AccessOption {
	return func(m *MemoryAccessRecords) { m.retain = d }
}

// AccessFlushDelay batches the file writes of Record (default 1s).
func AccessFlushDelay(d time.Duration) AccessOption {
	return func(m *MemoryAccessRecords) { m.flushDelay = d }
}

// MemoryAccessRecords implements AccessRecords in memory, optionally
// persisted to a JSON file (OpenAccessRecords).
//
// Persistence errs on the side of denial: Record is written behind, within
// the flush delay (a crash loses at most that much, which only costs a new
// upstream check); Revoke is written through before it returns, so a
// revocation survives a crash. Writes are atomic (temporary file, fsync,
// rename, fsync of the directory) and the file is 0600. A file that cannot
// be parsed is ignored (every project proves access again) and replaced at
// the next write.
type MemoryAccessRecords struct {
	mu         sync.Mutex
	recs       map[AccessKey]time.Time
	now        func() time.Time
	retain     time.Duration
	flushDelay time.Duration
	path       string
	timer      *time.Timer
	closed     bool
	flushErr   error
}

// NewAccessRecords returns records kept in memory only.
func NewAccessRecords(opts ...AccessOption) *MemoryAccessRecords {
	m := &MemoryAccessRecords{
		recs:       map[AccessKey]time.Time{},
		now:        time.Now,
		retain:     DefaultAccessRetention,
		flushDelay: DefaultAccessFlushDelay,
	}
	for _, o := range opts {
		o(m)
	}
	return m
}

// OpenAccessRecords loads records from path (if it exists) and keeps it up
// to date. Call Close to write the last changes.
func OpenAccessRecords(path string, opts ...AccessOption) (*MemoryAccessRecords, error) {
	m := NewAccessRecords(opts...)
	m.path = path
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cache: access records: %w", err)
	}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("cache: access records: %w", err)
	default:
		var f accessFile
		if json.Unmarshal(b, &f) == nil {
			cutoff := m.now().Add(-m.retain)
			for _, r := range f.Records {
				if r.At.After(cutoff) && r.Project != "" {
					m.recs[AccessKey{r.Project, r.Upstream, r.Repo}.norm()] = r.At
				}
			}
		}
	}
	return m, nil
}

type accessFile struct {
	Version int            `json:"version"`
	Records []accessRecord `json:"records"`
}

type accessRecord struct {
	Project  string    `json:"project"`
	Upstream string    `json:"upstream"`
	Repo     string    `json:"repo"`
	At       time.Time `json:"at"`
}

func (m *MemoryAccessRecords) Record(_ context.Context, k AccessKey, at time.Time) error {
	if k.Project == "" || k.Upstream == "" || k.Repo == "" {
		return fmt.Errorf("%w: access record needs a project, an upstream and a repository", ErrInvalidName)
	}
	k = k.norm()
	m.mu.Lock()
	defer m.mu.Unlock()
	if at.After(m.recs[k]) {
		m.recs[k] = at
		m.scheduleLocked()
	}
	return nil
}

func (m *MemoryAccessRecords) Valid(ctx context.Context, k AccessKey, ttl time.Duration) (bool, error) {
	at, ok, err := m.Last(ctx, k)
	if err != nil || !ok || ttl <= 0 {
		return false, err
	}
	age := m.now().Sub(at)
	return age < ttl, nil
}

func (m *MemoryAccessRecords) Last(_ context.Context, k AccessKey) (time.Time, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	at, ok := m.recs[k.norm()]
	return at, ok, nil
}

func (m *MemoryAccessRecords) Revoke(_ context.Context, k AccessKey) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	k = k.norm()
	if _, ok := m.recs[k]; !ok {
		return nil
	}
	delete(m.recs, k)
	return m.writeLocked()
}

// Flush writes pending changes now.
func (m *MemoryAccessRecords) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writeLocked()
}

// Close writes pending changes and stops background writes.
func (m *MemoryAccessRecords) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	if m.timer != nil {
		m.timer.Stop()
		m.timer = nil
	}
	return m.writeLocked()
}

func (m *MemoryAccessRecords) scheduleLocked() {
	if m.path == "" || m.closed || m.timer != nil {
		return
	}
	m.timer = time.AfterFunc(m.flushDelay, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.timer = nil
		if !m.closed {
			m.flushErr = m.writeLocked()
		}
	})
}

func (m *MemoryAccessRecords) writeLocked() error {
	if m.path == "" {
		return nil
	}
	cutoff := m.now().Add(-m.retain)
	f := accessFile{Version: 1, Records: make([]accessRecord, 0, len(m.recs))}
	for k, at := range m.recs {
		if !at.After(cutoff) {
			delete(m.recs, k)
			continue
		}
		f.Records = append(f.Records, accessRecord{k.Project, k.Upstream, k.Repo, at.UTC()})
	}
	sort.Slice(f.Records, func(i, j int) bool {
		a, b := f.Records[i], f.Records[j]
		if a.Project != b.Project {
			return a.Project < b.Project
		}
		if a.Upstream != b.Upstream {
			return a.Upstream < b.Upstream
		}
		return a.Repo < b.Repo
	})
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(m.path, append(b, '\n'))
}

// writeFileAtomic writes a 0600 file that is either entirely old or
// entirely new, even across a crash.
func writeFileAtomic(path string, b []byte) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("cache: write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err = tmp.Chmod(0o600); err != nil {
		return err
	}
	if _, err = tmp.Write(b); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	syncDir(dir)
	return nil
}
