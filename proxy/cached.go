package proxy

// The caching fetcher (issue 4): it wraps the direct fetcher with the
// content cache of package cache, and enforces tenant isolation (DESIGN.md
// invariant 2) before anything is served from it:
//
//  1. access: project P's own credential must have been accepted by the
//     upstream for the repository within access_ttl (an access record);
//     otherwise it is proven now with a HEAD upstream made with P's
//     credential. 401/403 revoke the record and deny at once; an upstream
//     outage serves from the cache only if P proved access before.
//  2. location: the cache itself checks that the digest is in the
//     repository (cache.In), with a HEAD of P's credential when unknown.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

// Default cache settings (docs/CONFIG.md, cache:).
const (
	DefaultCacheTagTTL    = time.Minute
	DefaultCacheAccessTTL = 10 * time.Minute
)

// CachedOptions configure NewCachedFetcher.
type CachedOptions struct {
	// TagTTL is how long a cached tag is served before it is revalidated
	// upstream (default 1m).
	TagTTL time.Duration
	// AccessTTL is how long a project's proven access to a repository
	// lets it read cached content without asking the upstream (default 10m).
	AccessTTL time.Duration
	// Logger logs stale serves and denials (never a credential).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// MaxManifestSize is named in the error of a manifest over the cache's
	// limit (default 4 MiB).
	MaxManifestSize int64
	// Registerer, when set, gets pullsecret_cache_access_checks_total
	// {project,upstream,result}: result is "valid" (a record within
	// access_ttl), "proven" (the upstream accepted the project's
	// credential), "denied" (401/403: revoked), "outage" (upstream down,
	// served on an earlier record) or "failed".
	Registerer prometheus.Registerer
}

// CachedFetcher serves manifests and blobs from a cache.Cache, filling it
// through the wrapped (direct) fetcher with the requesting project's own
// credential. Tags lists and referrers pass through.
type CachedFetcher struct {
	next      Fetcher
	c         *cache.Cache
	records   cache.AccessRecords
	tagTTL    time.Duration
	accessTTL time.Duration
	log       *slog.Logger
	now       func() time.Time
	checks    *prometheus.CounterVec
	maxMan    int64
}

// NewCachedFetcher wraps next with the cache c and the access records.
func NewCachedFetcher(next Fetcher, c *cache.Cache, records cache.AccessRecords, o CachedOptions) *CachedFetcher {
	f := &CachedFetcher{next: next, c: c, records: records, tagTTL: o.TagTTL, accessTTL: o.AccessTTL, log: o.Logger, now: o.Now}
	if f.tagTTL <= 0 {
		f.tagTTL = DefaultCacheTagTTL
	}
	if f.accessTTL <= 0 {
		f.accessTTL = DefaultCacheAccessTTL
	}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if f.now == nil {
		f.now = time.Now
	}
	f.maxMan = o.MaxManifestSize
	if f.maxMan <= 0 {
		f.maxMan = DefaultMaxManifestSize
	}
	if o.Registerer != nil {
		cv := prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pullsecret_cache_access_checks_total",
			Help: "Access checks of tenant isolation before serving cached content, by result.",
		}, []string{"project", "upstream", "result"})
		if err := o.Registerer.Register(cv); err == nil {
			f.checks = cv
		} else if are, ok := err.(prometheus.AlreadyRegisteredError); ok {
			f.checks, _ = are.ExistingCollector.(*prometheus.CounterVec)
		}
	}
	return f
}

func (f *CachedFetcher) count(t Target, result string) {
	if f.checks != nil {
		f.checks.WithLabelValues(t.Project, t.Upstream, result).Inc()
	}
}

func accessKey(t Target) cache.AccessKey {
	return cache.AccessKey{Project: t.Project, Upstream: t.Upstream, Repo: t.Repo}
}

// deniedErr reports whether err is the upstream refusing the project's
// credential (401/403, DENIED, UNAUTHORIZED): never served stale.
func deniedErr(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden ||
		e.Code == CodeDenied || e.Code == CodeUnauthorized
}

// unavailableErr reports whether err is an upstream outage (unreachable,
// timeout, 5xx, 429) that allows serving cached data.
func unavailableErr(err error) bool {
	if err == nil || deniedErr(err) {
		return false
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Status >= 500 || e.Status == http.StatusTooManyRequests ||
			e.Code == CodeUnavailable || e.Code == CodeTooManyRequests
	}
	return errors.Is(err, context.DeadlineExceeded)
}

// markUnavailable wraps an outage with cache.Unavailable so the tag cache
// may serve stale; anything else (401/403 first of all) is left as is.
func markUnavailable(err error) error {
	if unavailableErr(err) {
		return cache.Unavailable(err)
	}
	return err
}

// proven handles the outcome of an upstream access proof made with the
// project's own credential.
func (f *CachedFetcher) proven(ctx context.Context, t Target, err error) error {
	k := accessKey(t)
	switch {
	case err == nil:
		f.count(t, "proven")
		f.records.Record(ctx, k, f.now())
		return nil
	case deniedErr(err):
		f.count(t, "denied")
		f.records.Revoke(ctx, k)
		f.log.Info("cache: upstream refused the project's credential; access revoked", "project", t.Project, "upstream", t.Upstream, "repo", t.Repo)
		return err
	case unavailableErr(err):
		if _, ok, _ := f.records.Last(ctx, k); ok {
			f.count(t, "outage")
			f.log.Warn("cache: upstream unavailable; serving from the cache on an earlier access record", "project", t.Project, "upstream", t.Upstream, "repo", t.Repo, "err", err)
			return nil
		}
		f.count(t, "failed")
		return err
	default:
		f.count(t, "failed")
		return err
	}
}

// validAccess reports whether the project's access record is still valid.
func (f *CachedFetcher) validAccess(ctx context.Context, t Target) bool {
	ok, err := f.records.Valid(ctx, accessKey(t), f.accessTTL)
	if ok && err == nil {
		f.count(t, "valid")
		return true
	}
	return false
}

// ensureAccess proves access with probe unless the record is valid.
func (f *CachedFetcher) ensureAccess(ctx context.Context, t Target, probe func(context.Context) error) error {
	if f.validAccess(ctx, t) {
		return nil
	}
	return f.proven(ctx, t, probe(ctx))
}

func toDigest(h v1.Hash) digest.Digest { return digest.Digest(h.String()) }

// acceptable reports whether a manifest media type suits the client.
func acceptable(mt string, accept []string) bool {
	if len(accept) == 0 {
		return slices.Contains(defaultManifestAccept, mt)
	}
	return slices.Contains(accept, mt)
}

// Manifest implements Fetcher.
func (f *CachedFetcher) Manifest(ctx context.Context, t Target, ref string, req ManifestRequest) (*Manifest, error) {
	if !strings.Contains(ref, ":") {
		return f.manifestByTag(ctx, t, ref, req)
	}
	h, err := v1.NewHash(ref)
	if err != nil {
		return nil, newError(http.StatusBadRequest, CodeDigestInvalid, "invalid digest")
	}
	head := func(ctx context.Context) error {
		_, err := f.next.Manifest(ctx, t, ref, ManifestRequest{Head: true})
		return err
	}
	if err := f.ensureAccess(ctx, t, head); err != nil {
		return nil, err
	}
	return f.manifestByDigest(ctx, t, h, req)
}

func (f *CachedFetcher) manifestByDigest(ctx context.Context, t Target, h v1.Hash, req ManifestRequest) (*Manifest, error) {
	ref := h.String()
	get := func(fctx context.Context) (cache.Fetched, error) {
		m, err := f.next.Manifest(fctx, t, ref, ManifestRequest{})
		if err != nil {
			return cache.Fetched{}, err
		}
		return cache.Fetched{Body: io.NopCloser(bytes.NewReader(m.Body)), Size: m.Size, MediaType: m.MediaType}, nil
	}
	check := func(ctx context.Context) error {
		_, err := f.next.Manifest(ctx, t, ref, ManifestRequest{Head: true})
		return err
	}
	m, err := f.c.Manifest(ctx, toDigest(h), get, cache.In(t.Upstream, t.Repo, check), cache.Project(t.Project))
	if err != nil {
		if e := f.cacheError(t, err); e != nil {
			return nil, e
		}
		f.log.Debug("cache: manifest not served from the cache; going direct", "upstream", t.Upstream, "repo", t.Repo, "err", err)
		return f.next.Manifest(ctx, t, ref, req)
	}
	out := &Manifest{MediaType: m.MediaType, Digest: h, Size: m.Size}
	if !req.Head {
		out.Body = m.Content
	}
	return out, nil
}

func (f *CachedFetcher) manifestByTag(ctx context.Context, t Target, tag string, req ManifestRequest) (*Manifest, error) {
	valid := f.validAccess(ctx, t)
	proved := false
	revalidate := func(ctx context.Context) (cache.Descriptor, error) {
		m, err := f.next.Manifest(ctx, t, tag, ManifestRequest{Head: true, Accept: req.Accept})
		if err != nil {
			if deniedErr(err) {
				f.count(t, "denied")
				f.records.Revoke(ctx, accessKey(t))
			}
			return cache.Descriptor{}, markUnavailable(err)
		}
		// A successful revalidation proves access, too.
		if !valid {
			f.count(t, "proven")
		}
		f.records.Record(ctx, accessKey(t), f.now())
		proved = true
		return cache.Descriptor{Digest: toDigest(m.Digest), MediaType: m.MediaType, Size: m.Size}, nil
	}
	ttl := f.tagTTL
	if !valid {
		ttl = -1 // always ask the upstream: it proves access
	}
	desc, stale, err := f.c.ResolveTag(ctx, cache.TagKey{Upstream: t.Upstream, Repo: t.Repo, Tag: tag}, ttl, revalidate, cache.Project(t.Project))
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			return nil, e
		}
		if errors.Is(err, cache.ErrInvalidName) {
			return f.next.Manifest(ctx, t, tag, req)
		}
		return nil, mapTransportError(t, err, true)
	}
	if stale && !valid && !proved {
		if _, ok, _ := f.records.Last(ctx, accessKey(t)); ok {
			f.count(t, "outage")
		}
	}
	if stale {
		f.log.Warn("cache: upstream unavailable; serving a stale tag", "project", t.Project, "upstream", t.Upstream, "repo", t.Repo, "tag", tag, "digest", desc.Digest.String())
	}
	if !valid && !proved {
		// Served stale without a fresh proof: only on an earlier record.
		if _, ok, _ := f.records.Last(ctx, accessKey(t)); !ok {
			f.count(t, "failed")
			return nil, newError(http.StatusServiceUnavailable, CodeUnavailable, "upstream %s is unavailable and this project has not proven access to %s", t.Upstream, t.Repo)
		}
	}
	if !acceptable(desc.MediaType, req.Accept) {
		return f.next.Manifest(ctx, t, tag, req)
	}
	h, err := v1.NewHash(desc.Digest.String())
	if err != nil {
		return f.next.Manifest(ctx, t, tag, req)
	}
	if req.Head && desc.Size > 0 {
		return &Manifest{MediaType: desc.MediaType, Digest: h, Size: desc.Size}, nil
	}
	return f.manifestByDigest(ctx, t, h, req)
}

// cacheError maps a cache error to what the client sees; nil means the
// cache could not serve the request and the direct fetcher should.
func (f *CachedFetcher) cacheError(t Target, err error) *Error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, cache.ErrDigestMismatch), errors.Is(err, cache.ErrSizeMismatch):
		return newError(http.StatusBadGateway, CodeManifestInvalid, "upstream %s sent content whose digest does not match; nothing was served or cached", t.Upstream).withCause(err)
	case errors.Is(err, cache.ErrManifestTooLarge):
		return tooLarge(t, f.maxMan)
	case errors.Is(err, context.Canceled):
		return asError(err)
	case errors.Is(err, context.DeadlineExceeded):
		return newError(http.StatusGatewayTimeout, CodeUnavailable, "upstream %s timed out", t.Upstream).withCause(err)
	}
	return nil
}

// Blob implements Fetcher.
func (f *CachedFetcher) Blob(ctx context.Context, t Target, d v1.Hash, req BlobRequest) (*Blob, error) {
	headBlob := func(ctx context.Context) error {
		_, err := f.next.Blob(ctx, t, d, BlobRequest{Head: true})
		return err
	}
	dd := toDigest(d)
	if req.Head {
		if req.Range != nil || !f.validAccess(ctx, t) {
			// The HEAD upstream proves access and location at once.
			b, err := f.next.Blob(ctx, t, d, req)
			if perr := f.proven(ctx, t, err); perr != nil {
				return nil, perr
			}
			if err == nil {
				f.c.AddToRepo(ctx, dd, t.Upstream, t.Repo)
				return b, nil
			}
			// Upstream down, but access proven earlier: the cache answers.
		}
		desc, err := f.c.Stat(ctx, cache.KindBlob, dd, cache.In(t.Upstream, t.Repo, headBlob), cache.Project(t.Project))
		if err != nil {
			if e := f.cacheError(t, err); e != nil && !errors.Is(err, cache.ErrNotFound) {
				return nil, e
			}
			return f.next.Blob(ctx, t, d, req)
		}
		return &Blob{Digest: d, Size: desc.Size, Length: desc.Size}, nil
	}
	if !f.validAccess(ctx, t) {
		_, err := f.next.Blob(ctx, t, d, BlobRequest{Head: true})
		if perr := f.proven(ctx, t, err); perr != nil {
			return nil, perr
		}
		if err == nil {
			f.c.AddToRepo(ctx, dd, t.Upstream, t.Repo)
		}
	}
	getRaw := func(fctx context.Context) (cache.Fetched, error) {
		b, err := f.next.Blob(fctx, t, d, BlobRequest{Raw: true})
		if err != nil {
			return cache.Fetched{}, err
		}
		return cache.Fetched{Body: b.Body, Size: b.Size}, nil
	}
	r, err := f.c.Blob(ctx, dd, getRaw, cache.In(t.Upstream, t.Repo, headBlob), cache.Project(t.Project))
	if err != nil {
		if e := f.cacheError(t, err); e != nil {
			return nil, e
		}
		f.log.Debug("cache: blob not served from the cache; going direct", "upstream", t.Upstream, "repo", t.Repo, "err", err)
		return f.next.Blob(ctx, t, d, req)
	}
	size := r.Size()
	if req.Range == nil {
		return &Blob{Digest: d, Size: size, Length: size, Body: &cachedBody{r}}, nil
	}
	if size < 0 {
		r.Close()
		return f.next.Blob(ctx, t, d, req)
	}
	first, last := req.Range.Start, req.Range.End
	switch {
	case first < 0:
		first, last = max(0, size+first), size-1
	case last < 0 || last >= size:
		last = size - 1
	}
	if first >= size || size == 0 {
		r.Close()
		e := newError(http.StatusRequestedRangeNotSatisfiable, CodeRangeInvalid, "requested range not satisfiable")
		e.Header = http.Header{"Content-Range": {"bytes */" + strconv.FormatInt(size, 10)}}
		return nil, e
	}
	if _, err := r.Seek(first, io.SeekStart); err != nil {
		r.Close()
		return nil, mapTransportError(t, err, true)
	}
	n := last - first + 1
	return &Blob{Digest: d, Size: size, Length: n, Partial: &ContentRange{First: first, Last: last, Total: size},
		Body: struct {
			io.Reader
			io.Closer
		}{io.LimitReader(r, n), r}}, nil
}

// cachedBody is a whole blob served by the cache. The server writes a
// committed entry with WriteTo (sendfile on the filesystem driver) and
// does not count its bytes as upstream bytes: the cache counts those.
type cachedBody struct{ *cache.Reader }

// hit reports whether the blob comes from a committed cache entry (not
// from a fill in flight, whose bytes may still fail verification).
func (b *cachedBody) hit() bool { return b.Source() == cache.SourceCache }

// Tags implements Fetcher: straight to the upstream.
func (f *CachedFetcher) Tags(ctx context.Context, t Target, q TagQuery) (*TagList, error) {
	return f.next.Tags(ctx, t, q)
}

// Referrers implements Fetcher: straight to the upstream.
func (f *CachedFetcher) Referrers(ctx context.Context, t Target, d v1.Hash, artifactType string) (*Referrers, error) {
	return f.next.Referrers(ctx, t, d, artifactType)
}
