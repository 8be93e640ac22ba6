package cache

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Manifest is a manifest's content and descriptor.
type Manifest struct {
	Descriptor
	Content []byte
	// Source tells whether it came from the cache, from a fetch this
	// request started, or from one it joined.
	Source Source
}

// mfill is one upstream fetch of a manifest, buffered in memory (a few KiB,
// at most the manifest size limit) and shared by every concurrent request.
type mfill struct {
	k      key
	origin *repoRef
	labels Labels
	done   chan struct{}

	m           Manifest
	err         error
	fetchFailed bool
}

type manifestMeta struct {
	MediaType string `json:"mediaType"`
	Size      int64  `json:"size"`
}

// Manifest returns the manifest d: from the cache (verified again on every
// read: it is small), or fetched once for every concurrent caller, hashed,
// stored, and returned. The rules of Blob apply: the fetch runs on its own
// context with the fill deadline, a digest mismatch or a manifest over the
// size limit fails every waiter and caches nothing, a fetch-phase failure
// makes joiners retry with their own fetch, In scopes the request to a
// repository, and a nil fetch turns a miss into ErrNotFound.
func (c *Cache) Manifest(ctx context.Context, d digest.Digest, fetch FetchFunc, opts ...RequestOption) (*Manifest, error) {
	if err := validDigest(d); err != nil {
		return nil, err
	}
	o := newRequest(opts)
	k := key{KindManifest, d}
	for attempt := 0; ; attempt++ {
		m, retry, err := c.manifestOnce(ctx, k, fetch, o)
		if retry && attempt < 3 {
			continue
		}
		return m, err
	}
}

func (c *Cache) manifestOnce(ctx context.Context, k key, fetch FetchFunc, o *request) (*Manifest, bool, error) {
	recentRetried := false
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, false, ErrClosed
		}
		if waited, err := c.waitDeleting(ctx, k); waited {
			c.mu.Unlock()
			if err != nil {
				return nil, false, err
			}
			continue
		}
		if mf := c.mfills[k]; mf != nil {
			c.mu.Unlock()
			if o.in != nil && (mf.origin == nil || *mf.origin != *o.in) {
				if err := c.ensureLocated(ctx, k, o, nil); err != nil {
					return nil, false, err
				}
			}
			return c.waitManifest(ctx, mf, false, fetch != nil, o)
		}
		c.inuse[k]++
		c.mu.Unlock()
		m, err := c.readManifest(ctx, k)
		c.release(k)
		if err == nil {
			if err := c.ensureLocated(ctx, k, o, nil); err != nil {
				return nil, false, err
			}
			c.m.Hit(KindManifest, o.labels)
			c.touch(k)
			return m, false, nil
		}
		if !isNotFound(err) && !errors.Is(err, ErrDigestMismatch) {
			return nil, false, err
		}
		if errors.Is(err, ErrDigestMismatch) {
			c.log.Error("cache: stored manifest does not match its digest; fetching it again", "digest", k.d)
		}
		c.mu.Lock()
		if c.mfills[k] != nil {
			c.mu.Unlock()
			continue
		}
		if _, ok := c.recent[k]; ok && !recentRetried && isNotFound(err) {
			recentRetried = true
			c.mu.Unlock()
			continue
		}
		if fetch == nil {
			c.mu.Unlock()
			return nil, false, fmt.Errorf("%w: manifest %s", ErrNotFound, k.d)
		}
		mf := &mfill{k: k, origin: o.in, labels: o.labels, done: make(chan struct{})}
		c.mfills[k] = mf
		c.wg.Add(1)
		c.mu.Unlock()
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.fillTimeout)
		stop := context.AfterFunc(c.baseCtx, cancel)
		go func() {
			defer c.wg.Done()
			defer cancel()
			defer stop()
			c.runManifestFill(fctx, mf, fetch, o.size)
		}()
		return c.waitManifest(ctx, mf, true, true, o)
	}
}

func (c *Cache) waitManifest(ctx context.Context, mf *mfill, own, canFetch bool, o *request) (*Manifest, bool, error) {
	select {
	case <-mf.done:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	if mf.err != nil {
		return nil, mf.fetchFailed && !own && canFetch, mf.err
	}
	if own {
		c.m.Miss(KindManifest, o.labels)
	} else {
		c.m.Coalesced(KindManifest, o.labels)
	}
	m := mf.m
	m.Content = bytes.Clone(mf.m.Content)
	m.Source = sourceOf(own)
	return &m, false, nil
}

func (c *Cache) runManifestFill(ctx context.Context, mf *mfill, fetch FetchFunc, expect int64) {
	m, phase, err := c.fetchManifest(ctx, mf.k.d, fetch, expect)
	if err != nil {
		if errors.Is(err, context.Canceled) && c.baseCtx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ErrClosed, err)
		}
		fe := &FillError{Kind: KindManifest, Digest: mf.k.d, Phase: phase, Err: err}
		mf.err, mf.fetchFailed = fe, phase == "fetch"
		c.m.FillFailure(KindManifest, mf.labels, failureReason(fe))
		c.log.Warn("cache: fill failed", "kind", KindManifest, "digest", mf.k.d, "phase", phase, "err", err)
		// Gone from mfills before its waiters wake: a request after the
		// failure starts a fill of its own instead of joining this one.
		c.forgetManifestFill(mf)
		close(mf.done)
		return
	}
	mf.m = m
	close(mf.done) // waiters have their answer; storing it is ours
	if serr := c.storeManifest(ctx, mf.k, m.Content, m.MediaType); serr != nil {
		c.m.FillFailure(KindManifest, mf.labels, "commit")
		c.log.Warn("cache: commit failed", "kind", KindManifest, "digest", mf.k.d, "err", serr)
	} else {
		c.markCommitted(mf.k)
		if mf.origin != nil {
			if lerr := c.addLocation(ctx, mf.k.d, *mf.origin); lerr != nil {
				c.log.Warn("cache: record location", "digest", mf.k.d, "err", lerr)
			}
		}
	}
	c.forgetManifestFill(mf)
}

func (c *Cache) forgetManifestFill(mf *mfill) {
	c.mu.Lock()
	if c.mfills[mf.k] == mf {
		delete(c.mfills, mf.k)
	}
	c.mu.Unlock()
}

func (c *Cache) fetchManifest(ctx context.Context, d digest.Digest, fetch FetchFunc, expect int64) (Manifest, string, error) {
	fetched, err := fetch(ctx)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return Manifest{}, "fetch", err
	}
	if fetched.Body == nil {
		return Manifest{}, "fetch", errors.New("fetch returned no body")
	}
	defer fetched.Body.Close()
	defer context.AfterFunc(ctx, func() { _ = fetched.Body.Close() })()
	limit := c.cfg.maxManifest
	if fetched.Size > limit || expect > limit {
		return Manifest{}, "fetch", fmt.Errorf("%w: %d bytes, limit %d", ErrManifestTooLarge, max(fetched.Size, expect), limit)
	}
	content, err := io.ReadAll(io.LimitReader(fetched.Body, limit+1))
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return Manifest{}, "transfer", err
	}
	n := int64(len(content))
	switch {
	case n > limit:
		return Manifest{}, "transfer", fmt.Errorf("%w: more than %d bytes", ErrManifestTooLarge, limit)
	case fetched.Size >= 0 && n != fetched.Size:
		return Manifest{}, "transfer", fmt.Errorf("%w: upstream sent %d of %d bytes", ErrSizeMismatch, n, fetched.Size)
	case expect >= 0 && n != expect:
		return Manifest{}, "transfer", fmt.Errorf("%w: %d bytes, expected %d", ErrSizeMismatch, n, expect)
	}
	if got := d.Algorithm().FromBytes(content); got != d {
		return Manifest{}, "transfer", fmt.Errorf("%w: got %s", ErrDigestMismatch, got)
	}
	mt := fetched.MediaType
	if mt == "" {
		mt = sniffMediaType(content)
	}
	return Manifest{Descriptor: Descriptor{Digest: d, MediaType: mt, Size: n}, Content: content}, "", nil
}

// PutManifest stores a manifest the caller fetched itself (by tag, say),
// under its sha256 digest, and returns its descriptor. With In, its
// location (and that of what it references) is recorded; the check of In
// is not used: the caller vouches that the content came from there.
func (c *Cache) PutManifest(ctx context.Context, content []byte, mediaType string, opts ...RequestOption) (Descriptor, error) {
	o := newRequest(opts)
	if int64(len(content)) > c.cfg.maxManifest {
		return Descriptor{}, fmt.Errorf("%w: %d bytes, limit %d", ErrManifestTooLarge, len(content), c.cfg.maxManifest)
	}
	if mediaType == "" {
		mediaType = sniffMediaType(content)
	}
	d := digest.FromBytes(content)
	k := key{KindManifest, d}
	desc := Descriptor{Digest: d, MediaType: mediaType, Size: int64(len(content))}
	if _, err := c.drv.Stat(ctx, dataPath(k)); err != nil {
		if !isNotFound(err) {
			return Descriptor{}, err
		}
		if err := c.storeManifest(ctx, k, content, mediaType); err != nil {
			return Descriptor{}, fmt.Errorf("cache: store manifest %s: %w", d, err)
		}
		c.markCommitted(k)
	} else {
		c.touch(k)
	}
	if o.in != nil {
		if err := c.addLocation(ctx, d, *o.in); err != nil {
			return desc, err
		}
	}
	return desc, nil
}

// storeManifest writes meta (first) then data (commitFile).
func (c *Cache) storeManifest(ctx context.Context, k key, content []byte, mediaType string) error {
	meta, _ := json.Marshal(manifestMeta{MediaType: mediaType, Size: int64(len(content))})
	if err := c.drv.PutContent(ctx, entryDir(k)+"/"+metaName, meta); err != nil {
		return err
	}
	return c.commitFile(ctx, k, bytes.NewReader(content), int64(len(content)))
}

// readManifest reads a committed manifest and verifies it.
func (c *Cache) readManifest(ctx context.Context, k key) (*Manifest, error) {
	content, err := c.drv.GetContent(ctx, dataPath(k))
	if err != nil {
		return nil, err
	}
	if got := k.d.Algorithm().FromBytes(content); got != k.d {
		return nil, fmt.Errorf("%w: stored manifest %s hashes to %s", ErrDigestMismatch, k.d, got)
	}
	return &Manifest{
		Descriptor: Descriptor{Digest: k.d, MediaType: c.manifestMediaType(ctx, k, content), Size: int64(len(content))},
		Content:    content,
		Source:     SourceCache,
	}, nil
}

func (c *Cache) manifestMediaType(ctx context.Context, k key, content []byte) string {
	if b, err := c.drv.GetContent(ctx, entryDir(k)+"/"+metaName); err == nil {
		var m manifestMeta
		if json.Unmarshal(b, &m) == nil && m.MediaType != "" {
			return m.MediaType
		}
	}
	return sniffMediaType(content)
}

// Stat returns the descriptor of a committed blob or manifest (Fetched
// unset), or ErrNotFound. With In, the location rules apply (a HEAD must
// not reveal what a GET would not serve).
func (c *Cache) Stat(ctx context.Context, kind Kind, d digest.Digest, opts ...RequestOption) (Descriptor, error) {
	if err := validDigest(d); err != nil {
		return Descriptor{}, err
	}
	k := key{kind, d}
	fi, err := c.drv.Stat(ctx, dataPath(k))
	if err != nil {
		if isNotFound(err) {
			return Descriptor{}, fmt.Errorf("%w: %s %s", ErrNotFound, kind, d)
		}
		return Descriptor{}, err
	}
	if err := c.ensureLocated(ctx, k, newRequest(opts), nil); err != nil {
		return Descriptor{}, err
	}
	desc := Descriptor{Digest: d, Size: fi.Size()}
	if kind == KindManifest {
		if b, err := c.drv.GetContent(ctx, entryDir(k)+"/"+metaName); err == nil {
			var m manifestMeta
			if json.Unmarshal(b, &m) == nil {
				desc.MediaType = m.MediaType
			}
		}
	}
	return desc, nil
}

// sniffMediaType guesses the media type of a manifest stored without one.
func sniffMediaType(content []byte) string {
	var probe struct {
		SchemaVersion int             `json:"schemaVersion"`
		MediaType     string          `json:"mediaType"`
		Manifests     json.RawMessage `json:"manifests"`
	}
	if json.Unmarshal(content, &probe) != nil {
		return ""
	}
	switch {
	case probe.MediaType != "":
		return probe.MediaType
	case probe.SchemaVersion == 1:
		return string(types.DockerManifestSchema1Signed)
	case probe.Manifests != nil:
		return string(types.OCIImageIndex)
	}
	return string(types.OCIManifestSchema1)
}

// manifestRefs lists what a manifest references: an index's manifests, an
// image's config and layers, a referrer's subject (schema 1: its
// fsLayers). Unparseable content references nothing.
func manifestRefs(mediaType string, content []byte) []digest.Digest {
	mt := types.MediaType(mediaType)
	if mt == "" {
		mt = types.MediaType(sniffMediaType(content))
	}
	var refs []digest.Digest
	add := func(h v1.Hash) {
		if d := digest.Digest(h.String()); h.Hex != "" && d.Validate() == nil {
			refs = append(refs, d)
		}
	}
	switch {
	case mt.IsIndex():
		im, err := v1.ParseIndexManifest(bytes.NewReader(content))
		if err != nil {
			return nil
		}
		for _, m := range im.Manifests {
			add(m.Digest)
		}
		if im.Subject != nil {
			add(im.Subject.Digest)
		}
	case mt.IsSchema1():
		var s1 struct {
			FSLayers []struct {
				BlobSum string `json:"blobSum"`
			} `json:"fsLayers"`
		}
		if json.Unmarshal(content, &s1) != nil {
			return nil
		}
		for _, l := range s1.FSLayers {
			if d := digest.Digest(l.BlobSum); d.Validate() == nil {
				refs = append(refs, d)
			}
		}
	default:
		m, err := v1.ParseManifest(bytes.NewReader(content))
		if err != nil {
			return nil
		}
		add(m.Config.Digest)
		for _, l := range m.Layers {
			add(l.Digest)
		}
		if m.Subject != nil {
			add(m.Subject.Digest)
		}
	}
	return refs
}
