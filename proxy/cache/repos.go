package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// TagKey names a tag of a repository on an upstream registry. The upstream
// host (host[:port], compared case-insensitively) is part of every key: the
// same repository path on two registries never shares an entry.
type TagKey struct {
	Upstream string
	Repo     string
	Tag      string
}

func (k TagKey) String() string { return normHost(k.Upstream) + "/" + k.Repo + ":" + k.Tag }

var (
	// The repository path grammar of distribution/reference (without a
	// domain): lower-case components, no "..", no leading "_".
	repoRe = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*)*$`)
	tagRe  = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

func normHost(h string) string { return strings.ToLower(h) }

// escapeHost turns an upstream host[:port] (or [v6]:port) into one path
// component: [a-z0-9.-] stay, anything else becomes _xx (hex). "_" is not a
// host character, so the mapping is one-to-one.
func escapeHost(h string) (string, error) {
	h = normHost(h)
	if h == "" || len(h) > 253+6 {
		return "", fmt.Errorf("%w: upstream %q", ErrInvalidName, h)
	}
	var b strings.Builder
	for i := 0; i < len(h); i++ {
		ch := h[i]
		if ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '.' && i > 0 {
			b.WriteByte(ch)
			continue
		}
		fmt.Fprintf(&b, "_%02x", ch)
	}
	return b.String(), nil
}

func repoDir(upstream, repo string) (string, error) {
	eh, err := escapeHost(upstream)
	if err != nil {
		return "", err
	}
	if len(repo) > 255 || !repoRe.MatchString(repo) {
		return "", fmt.Errorf("%w: repository %q", ErrInvalidName, repo)
	}
	return "/repos/" + eh + "/" + repo, nil
}

func tagPath(k TagKey) (string, error) {
	dir, err := repoDir(k.Upstream, k.Repo)
	if err != nil {
		return "", err
	}
	if !tagRe.MatchString(k.Tag) {
		return "", fmt.Errorf("%w: tag %q", ErrInvalidName, k.Tag)
	}
	return dir + "/_tags/" + k.Tag, nil
}

func linkPath(d digest.Digest, ref repoRef) (string, error) {
	dir, err := repoDir(ref.upstream, ref.repo)
	if err != nil {
		return "", err
	}
	return dir + "/_digests/" + string(d.Algorithm()) + "/" + d.Encoded(), nil
}

type tagEntry struct {
	Upstream string `json:"upstream"`
	Repo     string `json:"repo"`
	Tag      string `json:"tag"`
	Descriptor
}

// Tag returns the cached descriptor of a tag (ErrNotFound when there is
// none), however old: ResolveTag applies the revalidation policy.
func (c *Cache) Tag(ctx context.Context, k TagKey) (Descriptor, error) {
	p, err := tagPath(k)
	if err != nil {
		return Descriptor{}, err
	}
	b, err := c.drv.GetContent(ctx, p)
	if err != nil {
		if isNotFound(err) {
			return Descriptor{}, fmt.Errorf("%w: tag %s", ErrNotFound, k)
		}
		return Descriptor{}, fmt.Errorf("cache: read tag %s: %w", k, err)
	}
	var e tagEntry
	if err := json.Unmarshal(b, &e); err != nil || e.Digest.Validate() != nil {
		return Descriptor{}, fmt.Errorf("%w: tag %s (unreadable entry)", ErrNotFound, k)
	}
	return e.Descriptor, nil
}

// SetTag stores the descriptor of a tag (Fetched defaults to now) and
// records that its manifest is in the tag's repository.
func (c *Cache) SetTag(ctx context.Context, k TagKey, desc Descriptor) error {
	p, err := tagPath(k)
	if err != nil {
		return err
	}
	if err := validDigest(desc.Digest); err != nil {
		return err
	}
	if desc.Fetched.IsZero() {
		desc.Fetched = c.now()
	}
	desc.Fetched = desc.Fetched.UTC()
	b, err := json.Marshal(tagEntry{Upstream: normHost(k.Upstream), Repo: k.Repo, Tag: k.Tag, Descriptor: desc})
	if err != nil {
		return err
	}
	if err := c.drv.PutContent(ctx, p, b); err != nil {
		return fmt.Errorf("cache: write tag %s: %w", k, err)
	}
	return c.addLocation(ctx, desc.Digest, repoRef{upstream: normHost(k.Upstream), repo: k.Repo})
}

// DeleteTag removes a tag entry (no error if there is none).
func (c *Cache) DeleteTag(ctx context.Context, k TagKey) error {
	p, err := tagPath(k)
	if err != nil {
		return err
	}
	if err := c.drv.Delete(ctx, p); err != nil && !isNotFound(err) {
		return err
	}
	return nil
}

// ResolveTag resolves a tag with the revalidation policy:
//
//   - a cached entry younger than ttl is returned as is (ttl 0: the cache's
//     tag TTL, 1m by default; ttl < 0: always revalidate);
//   - otherwise revalidate runs (a HEAD upstream with the project's
//     credential); its answer is stored and returned;
//   - if revalidate fails with an error wrapping ErrUpstreamUnavailable
//     (see Unavailable, StatusAllowsStale) and an entry is cached, that
//     entry is returned with stale = true (counted and logged);
//   - any other error (401, 403, 404, ...) is returned as is, never stale:
//     a revoked credential bites at once.
//
// Revalidations are not coalesced across callers: each caller's own
// credential must be the one that is answered.
func (c *Cache) ResolveTag(ctx context.Context, k TagKey, ttl time.Duration,
	revalidate func(ctx context.Context) (Descriptor, error), opts ...RequestOption) (Descriptor, bool, error) {
	o := newRequest(opts)
	o.labels.Upstream = normHost(k.Upstream)
	if ttl == 0 {
		ttl = c.cfg.tagTTL
	}
	cached, err := c.Tag(ctx, k)
	have := err == nil
	if err != nil && !errors.Is(err, ErrNotFound) {
		return Descriptor{}, false, err
	}
	age := c.now().Sub(cached.Fetched)
	if have && ttl > 0 && age < ttl {
		return cached, false, nil
	}
	if revalidate == nil {
		if have {
			return cached, true, nil
		}
		return Descriptor{}, false, fmt.Errorf("%w: tag %s", ErrNotFound, k)
	}
	fresh, rerr := revalidate(ctx)
	if rerr == nil {
		if err := validDigest(fresh.Digest); err != nil {
			return Descriptor{}, false, fmt.Errorf("cache: revalidate tag %s: %w", k, err)
		}
		if have && fresh.Digest == cached.Digest {
			if fresh.MediaType == "" {
				fresh.MediaType = cached.MediaType
			}
			if fresh.Size <= 0 {
				fresh.Size = cached.Size
			}
		}
		fresh.Fetched = c.now().UTC()
		if err := c.SetTag(ctx, k, fresh); err != nil {
			c.log.Warn("cache: store tag", "tag", k.String(), "err", err)
		}
		return fresh, false, nil
	}
	if have && errors.Is(rerr, ErrUpstreamUnavailable) {
		c.m.StaleServe(o.labels)
		c.log.Warn("cache: upstream unavailable, serving stale tag",
			"tag", k.String(), "digest", cached.Digest, "age", age.Round(time.Second).String(), "err", rerr)
		return cached, true, nil
	}
	return Descriptor{}, false, rerr
}

// InRepo reports whether digest d is known to be in upstream/repo: it was
// fetched through that repository, a manifest fetched through it references
// it, a tag of it points to it, or AddToRepo said so.
func (c *Cache) InRepo(ctx context.Context, d digest.Digest, upstream, repo string) (bool, error) {
	return c.inRepo(ctx, d, repoRef{upstream: normHost(upstream), repo: repo})
}

// AddToRepo records that d is in upstream/repo — after the upstream said so
// to a project's credential (a 200 to a HEAD). If d is a cached manifest,
// what it references is recorded too.
func (c *Cache) AddToRepo(ctx context.Context, d digest.Digest, upstream, repo string) error {
	if err := validDigest(d); err != nil {
		return err
	}
	return c.addLocation(ctx, d, repoRef{upstream: normHost(upstream), repo: repo})
}

const maxLocatedMemo = 1 << 16

func (c *Cache) inRepo(ctx context.Context, d digest.Digest, ref repoRef) (bool, error) {
	p, err := linkPath(d, ref)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	_, ok := c.located[p]
	c.mu.Unlock()
	if ok {
		return true, nil
	}
	if _, err := c.drv.Stat(ctx, p); err != nil {
		if isNotFound(err) {
			return false, nil
		}
		return false, fmt.Errorf("cache: read location: %w", err)
	}
	c.memoLocated(p)
	return true, nil
}

func (c *Cache) memoLocated(p string) {
	c.mu.Lock()
	if len(c.located) >= maxLocatedMemo {
		clear(c.located)
	}
	c.located[p] = struct{}{}
	c.mu.Unlock()
}

func (c *Cache) forgetLocated(p string) {
	c.mu.Lock()
	delete(c.located, p)
	c.mu.Unlock()
}

// addLocation records d in ref and, when d is a cached manifest, what it
// references (a registry holds a manifest's blobs and child manifests in the
// manifest's repository), two levels deep (index -> manifest -> blobs).
func (c *Cache) addLocation(ctx context.Context, d digest.Digest, ref repoRef) error {
	return c.addLocationDepth(ctx, d, ref, 2)
}

func (c *Cache) addLocationDepth(ctx context.Context, d digest.Digest, ref repoRef, depth int) error {
	p, err := linkPath(d, ref)
	if err != nil {
		return err
	}
	if ok, _ := c.inRepo(ctx, d, ref); !ok {
		if err := c.drv.PutContent(ctx, p, []byte(c.now().UTC().Format(time.RFC3339))); err != nil {
			return fmt.Errorf("cache: record location: %w", err)
		}
		c.memoLocated(p)
	}
	if depth == 0 {
		return nil
	}
	content, err := c.drv.GetContent(ctx, dataPath(key{KindManifest, d}))
	if err != nil {
		return nil // not a cached manifest
	}
	mt := c.manifestMediaType(ctx, key{KindManifest, d}, content)
	for _, r := range manifestRefs(mt, content) {
		if err := c.addLocationDepth(ctx, r, ref, depth-1); err != nil {
			return err
		}
	}
	return nil
}

// ensureLocated enforces In for a cached entry or a fill from elsewhere.
func (c *Cache) ensureLocated(ctx context.Context, k key, o *request, _ []byte) error {
	if o.in == nil {
		return nil
	}
	ok, err := c.inRepo(ctx, k.d, *o.in)
	if err != nil || ok {
		return err
	}
	if o.check == nil {
		return fmt.Errorf("%w: %s %s in %s/%s", ErrNotInRepository, k.kind, k.d, o.in.upstream, o.in.repo)
	}
	if err := o.check(ctx); err != nil {
		return err
	}
	return c.addLocation(ctx, k.d, *o.in)
}

// linkDigest parses the digest of a location link path.
func linkDigest(p string) (digest.Digest, bool) {
	dir, enc := path.Split(p)
	alg := path.Base(strings.TrimSuffix(dir, "/"))
	d := digest.NewDigestFromEncoded(digest.Algorithm(alg), enc)
	return d, d.Validate() == nil
}
