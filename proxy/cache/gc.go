package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
)

// Policy is a retention policy. Zero fields do not limit.
type Policy struct {
	// MaxSize is the most bytes of blobs and manifests to keep; least
	// recently used entries go first.
	MaxSize int64
	// OlderThan deletes entries not used for this long.
	OlderThan time.Duration
}

// GCResult reports what a GC run did.
type GCResult struct {
	Scanned, Deleted, Kept                int
	ScannedBytes, DeletedBytes, KeptBytes int64
	// Entries the policy wanted gone but that were kept: being read or
	// filled in this process, or referenced by a manifest that stays.
	SkippedInUse, SkippedReferenced int
	// Tag entries and location links removed with what they pointed to.
	TagsDeleted, LocationsDeleted int
	Duration                      time.Duration
}

// KindStats counts the entries of one kind.
type KindStats struct {
	Count int
	Bytes int64
}

// Stats describes the cache's content.
type Stats struct {
	Blobs, Manifests KindStats
	Tags             int
	FillsInFlight    int
}

// Count is the number of blobs and manifests.
func (s Stats) Count() int { return s.Blobs.Count + s.Manifests.Count }

// Bytes is the size of blobs and manifests.
func (s Stats) Bytes() int64 { return s.Blobs.Bytes + s.Manifests.Bytes }

type gcEntry struct {
	k        key
	size     int64
	last     time.Time
	hasData  bool
	sidecar  bool
	deleted  bool
	children []digest.Digest
}

// scan lists the entries of one kind with their last access: the newest of
// the data's modification time (the commit), the accessed sidecar and this
// process's in-memory record.
func (c *Cache) scan(ctx context.Context, kind Kind) (map[key]*gcEntry, error) {
	entries := map[key]*gcEntry{}
	root := kindRoot(kind)
	err := c.drv.Walk(ctx, root, func(fi storagedriver.FileInfo) error {
		if fi.IsDir() {
			return nil
		}
		// /<kind>/<alg>/<xx>/<hex>/<file>
		parts := strings.Split(strings.TrimPrefix(fi.Path(), "/"), "/")
		if len(parts) != 5 {
			return nil
		}
		d := digest.NewDigestFromEncoded(digest.Algorithm(parts[1]), parts[3])
		if d.Validate() != nil {
			return nil
		}
		k := key{kind, d}
		e := entries[k]
		if e == nil {
			e = &gcEntry{k: k}
			entries[k] = e
		}
		switch parts[4] {
		case dataName:
			e.hasData, e.size = true, fi.Size()
			if fi.ModTime().After(e.last) {
				e.last = fi.ModTime()
			}
		case accessedName:
			e.sidecar = true
		}
		return nil
	})
	if err != nil && !isNotFound(err) {
		return nil, fmt.Errorf("cache: scan %s: %w", root, err)
	}
	for k, e := range entries {
		if e.sidecar && e.hasData {
			if b, err := c.drv.GetContent(ctx, entryDir(k)+"/"+accessedName); err == nil {
				if t, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b))); err == nil && t.After(e.last) {
					e.last = t
				}
			}
		}
		c.mu.Lock()
		if ai := c.access[k]; ai != nil && ai.last.After(e.last) {
			e.last = ai.last
		}
		c.mu.Unlock()
	}
	return entries, nil
}

var errInUse = errors.New("in use")

// GC applies a retention policy: least recently used first, never an entry
// that a fill or an open reader of this process uses, never a blob or
// manifest referenced by a manifest that stays (an image stays whole).
// Deleting is crash-safe: the data first leaves its final path (moved
// into /_trash, or on s3-aws deleted, one object at once), then the rest
// of the entry goes; readers only read final paths. Tag
// entries and location links of what was deleted go too, as do leftovers
// of an interrupted deletion.
//
// Other processes' readers are not known here; on the filesystem driver an
// open file stays readable after deletion, on object stores a reader
// racing with GC may fail.
func (c *Cache) GC(ctx context.Context, p Policy) (GCResult, error) {
	start := time.Now()
	var res GCResult
	blobs, err := c.scan(ctx, KindBlob)
	if err != nil {
		return res, err
	}
	manifests, err := c.scan(ctx, KindManifest)
	if err != nil {
		return res, err
	}
	var all []*gcEntry
	refs := map[digest.Digest]int{}
	for _, m := range []map[key]*gcEntry{blobs, manifests} {
		for _, e := range m {
			if !e.hasData {
				c.removeOrphan(ctx, e.k)
				continue
			}
			if e.k.kind == KindManifest {
				if content, err := c.drv.GetContent(ctx, dataPath(e.k)); err == nil {
					e.children = manifestRefs(c.manifestMediaType(ctx, e.k, content), content)
					for _, d := range e.children {
						refs[d]++
					}
				}
			}
			all = append(all, e)
			res.Scanned++
			res.ScannedBytes += e.size
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if !all[i].last.Equal(all[j].last) {
			return all[i].last.Before(all[j].last)
		}
		return all[i].k.d < all[j].k.d
	})

	total := res.ScannedBytes
	cutoff := time.Time{}
	if p.OlderThan > 0 {
		cutoff = c.now().Add(-p.OlderThan)
	}
	var skipped map[key]string
	deletedDigests := map[digest.Digest]bool{}
	// Passes until nothing changes: deleting a manifest may free what it
	// referenced. What the last pass skipped is what was kept against the
	// policy.
	for changed := true; changed; {
		changed = false
		skipped = map[key]string{}
		for _, e := range all {
			if e.deleted {
				continue
			}
			want := (!cutoff.IsZero() && e.last.Before(cutoff)) || (p.MaxSize > 0 && total > p.MaxSize)
			if !want {
				continue
			}
			if refs[e.k.d] > 0 {
				skipped[e.k] = "referenced"
				continue
			}
			if err := c.deleteEntry(ctx, e.k); err != nil {
				if errors.Is(err, errInUse) {
					skipped[e.k] = "in use"
					continue
				}
				return res, err
			}
			e.deleted, changed = true, true
			deletedDigests[e.k.d] = true
			total -= e.size
			res.Deleted++
			res.DeletedBytes += e.size
			for _, d := range e.children {
				refs[d]--
			}
		}
	}
	for _, why := range skipped {
		if why == "referenced" {
			res.SkippedReferenced++
		} else {
			res.SkippedInUse++
		}
	}
	res.Kept = res.Scanned - res.Deleted
	res.KeptBytes = res.ScannedBytes - res.DeletedBytes

	// Tags and links that point at nothing any more.
	present := map[digest.Digest]bool{}
	for _, e := range all {
		if !e.deleted {
			present[e.k.d] = true
			for _, d := range e.children {
				present[d] = true // a link for content not fetched yet
			}
		}
	}
	if err := c.pruneRepos(ctx, present, deletedDigests, &res); err != nil {
		return res, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

// deleteEntry deletes one entry unless this process uses it.
func (c *Cache) deleteEntry(ctx context.Context, k key) error {
	c.mu.Lock()
	if c.inuse[k] > 0 || c.fills[k] != nil || c.mfills[k] != nil || c.deleting[k] != nil {
		c.mu.Unlock()
		return errInUse
	}
	ch := make(chan struct{})
	c.deleting[k] = ch
	delete(c.recent, k)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.deleting, k)
		delete(c.access, k)
		close(ch)
		c.mu.Unlock()
	}()
	if err := c.removeData(ctx, k); err != nil {
		if isNotFound(err) {
			return nil // gone already (another GC)
		}
		return fmt.Errorf("cache: delete %s %s: %w", k.kind, k.d, err)
	}
	if err := c.drv.Delete(ctx, entryDir(k)); err != nil && !isNotFound(err) {
		c.log.Warn("cache: delete entry", "digest", k.d, "err", err)
	}
	return nil
}

// removeOrphan removes an entry directory without data (sidecars left by
// an interrupted deletion).
func (c *Cache) removeOrphan(ctx context.Context, k key) {
	c.mu.Lock()
	if c.inuse[k] > 0 || c.fills[k] != nil || c.mfills[k] != nil || c.deleting[k] != nil {
		c.mu.Unlock()
		return
	}
	ch := make(chan struct{})
	c.deleting[k] = ch
	c.mu.Unlock()
	if _, err := c.drv.Stat(ctx, dataPath(k)); isNotFound(err) {
		_ = c.drv.Delete(ctx, entryDir(k))
	}
	c.mu.Lock()
	delete(c.deleting, k)
	close(ch)
	c.mu.Unlock()
}

// linkGrace keeps a location link of content that is not cached (yet) at
// least this long: a manifest being stored records its references first.
const linkGrace = time.Hour

func (c *Cache) pruneRepos(ctx context.Context, present, deleted map[digest.Digest]bool, res *GCResult) error {
	var tags, links []storagedriver.FileInfo
	err := c.drv.Walk(ctx, "/repos", func(fi storagedriver.FileInfo) error {
		if fi.IsDir() {
			return nil
		}
		dir := path.Dir(fi.Path())
		switch {
		case path.Base(dir) == "_tags":
			tags = append(tags, fi)
		case path.Base(path.Dir(dir)) == "_digests":
			links = append(links, fi)
		}
		return nil
	})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("cache: scan repositories: %w", err)
	}
	for _, fi := range tags {
		b, err := c.drv.GetContent(ctx, fi.Path())
		if err != nil {
			continue
		}
		var e tagEntry
		if json.Unmarshal(b, &e) != nil || deleted[e.Digest] {
			if c.drv.Delete(ctx, fi.Path()) == nil {
				res.TagsDeleted++
			}
		}
	}
	for _, fi := range links {
		d, ok := linkDigest(fi.Path())
		if !ok {
			continue
		}
		stale := deleted[d] || !present[d] && c.now().Sub(fi.ModTime()) > linkGrace
		if stale && c.drv.Delete(ctx, fi.Path()) == nil {
			c.forgetLocated(fi.Path())
			res.LocationsDeleted++
		}
	}
	return nil
}

// Stats counts the cache's blobs, manifests and tags.
func (c *Cache) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	for _, kind := range []Kind{KindBlob, KindManifest} {
		ents, err := c.scan(ctx, kind)
		if err != nil {
			return s, err
		}
		ks := &s.Blobs
		if kind == KindManifest {
			ks = &s.Manifests
		}
		for _, e := range ents {
			if e.hasData {
				ks.Count++
				ks.Bytes += e.size
			}
		}
	}
	err := c.drv.Walk(ctx, "/repos", func(fi storagedriver.FileInfo) error {
		if !fi.IsDir() && path.Base(path.Dir(fi.Path())) == "_tags" {
			s.Tags++
		}
		return nil
	})
	if err != nil && !isNotFound(err) {
		return s, err
	}
	c.mu.Lock()
	s.FillsInFlight = len(c.fills) + len(c.mfills)
	c.mu.Unlock()
	return s, nil
}

// RunGC runs GC every interval until ctx is done or the cache is closed,
// logging each run. Run it in its own goroutine. In a cluster (WithCluster)
// the replicas take turns through a lease: one run per interval across
// them all.
func (c *Cache) RunGC(ctx context.Context, interval time.Duration, p Policy) error {
	if interval <= 0 {
		return errors.New("cache: RunGC needs a positive interval")
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.baseCtx.Done():
			return ErrClosed
		case <-t.C:
			if !c.gcTurn(ctx, interval) {
				continue
			}
			res, err := c.GC(ctx, p)
			if err != nil {
				c.log.Warn("cache: gc", "err", err)
				continue
			}
			c.log.Info("cache: gc", "deleted", res.Deleted, "deleted_bytes", res.DeletedBytes,
				"kept", res.Kept, "kept_bytes", res.KeptBytes, "skipped_in_use", res.SkippedInUse,
				"skipped_referenced", res.SkippedReferenced, "duration", res.Duration.String())
		}
	}
}

// gcLeaseKey is the lease of the background GC in a cluster. Every replica
// would otherwise scan the same store each interval and race the others to
// delete the same entries.
const gcLeaseKey = "gc"

// gcTurn reports whether this process runs the background GC now: always
// alone; in a cluster, when it holds the GC lease, which its holder keeps by
// taking it again at each tick. It lasts one and a half intervals, so that
// a late tick of the holder does not hand it over; a dead holder's lease
// lapses and another replica's next tick takes it.
func (c *Cache) gcTurn(ctx context.Context, interval time.Duration) bool {
	cl := c.cfg.cluster
	if cl == nil {
		return true
	}
	l, mine, err := cl.Leases.Acquire(ctx, gcLeaseKey, cl.Self, cl.Addr, interval+interval/2)
	if err != nil {
		c.log.Warn("cache: gc skipped: lease", "err", err)
		return false
	}
	if !mine {
		c.log.Debug("cache: gc left to another replica", "holder", l.Holder)
	}
	return mine
}
