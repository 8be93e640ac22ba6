package proxy

// Fetcher is the seam between routing/authorization and the upstream: the
// server asks a Fetcher for manifests, blobs, tags and referrers of a
// Target (project, upstream, repository), and knows nothing of how they
// are obtained. The direct fetcher below goes to the upstream every time;
// a caching, coalescing fetcher (issue 4) wraps it without touching the
// server, through WithFetcher.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Fetcher fetches registry content for a Target. Errors are *Error values
// (registry errors ready for the client) or context errors.
type Fetcher interface {
	// Manifest fetches a manifest by tag or digest. The returned digest is
	// computed from the bytes for a GET, and checked against the reference
	// (by digest) or the upstream's Docker-Content-Digest (by tag).
	Manifest(ctx context.Context, t Target, ref string, req ManifestRequest) (*Manifest, error)
	// Blob fetches a blob, or a range of it. A full body verifies the
	// digest as it is read: the last bytes are withheld and the read fails
	// on a mismatch. Blob.Body must be closed.
	Blob(ctx context.Context, t Target, d v1.Hash, req BlobRequest) (*Blob, error)
	// Tags lists a repository's tags, one page at a time.
	Tags(ctx context.Context, t Target, q TagQuery) (*TagList, error)
	// Referrers lists the manifests whose subject is d (OCI referrers API).
	Referrers(ctx context.Context, t Target, d v1.Hash, artifactType string) (*Referrers, error)
}

// ManifestRequest says how a manifest is wanted.
type ManifestRequest struct {
	Head bool
	// Accept are the media types the client accepts, in the client's
	// order; empty means every manifest type this proxy knows.
	Accept []string
}

// Manifest is a fetched manifest.
type Manifest struct {
	MediaType string
	Digest    v1.Hash
	Size      int64
	Body      []byte // nil for HEAD
}

// BlobRequest says how a blob is wanted.
type BlobRequest struct {
	Head  bool
	Range *Range // nil: the whole blob
	// Raw skips the digest check of a whole body, for a caller that hashes
	// the bytes itself (a cache fill).
	Raw bool
}

// Range is one byte range: bytes Start..End inclusive, End < 0 meaning
// to the end of the blob; or, with Start < 0, the last -Start bytes.
type Range struct {
	Start, End int64
}

// String is the Range header value.
func (r Range) String() string {
	switch {
	case r.Start < 0:
		return "bytes=" + strconv.FormatInt(r.Start, 10)
	case r.End < 0:
		return "bytes=" + strconv.FormatInt(r.Start, 10) + "-"
	default:
		return "bytes=" + strconv.FormatInt(r.Start, 10) + "-" + strconv.FormatInt(r.End, 10)
	}
}

// ParseRange parses a Range header holding one byte range. Anything else
// (several ranges, other units, nonsense) gives ok=false: the header is
// ignored and the whole blob served, as RFC 9110 allows.
func ParseRange(h string) (Range, bool) {
	spec, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return Range{}, false
	}
	a, b, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return Range{}, false
	}
	num := func(s string) (int64, bool) {
		if s == "" || len(s) > 18 {
			return 0, false
		}
		for i := 0; i < len(s); i++ {
			if s[i] < '0' || s[i] > '9' {
				return 0, false
			}
		}
		n, err := strconv.ParseInt(s, 10, 64)
		return n, err == nil
	}
	if a == "" {
		n, ok := num(b)
		if !ok || n == 0 {
			return Range{}, false
		}
		return Range{Start: -n, End: -1}, true
	}
	start, ok := num(a)
	if !ok {
		return Range{}, false
	}
	if b == "" {
		return Range{Start: start, End: -1}, true
	}
	end, ok := num(b)
	if !ok || end < start {
		return Range{}, false
	}
	return Range{Start: start, End: end}, true
}

// ContentRange is the range a 206 answer holds: First..Last inclusive of
// Total bytes (Total < 0: unknown).
type ContentRange struct {
	First, Last, Total int64
}

// String is the Content-Range header value.
func (c ContentRange) String() string {
	total := "*"
	if c.Total >= 0 {
		total = strconv.FormatInt(c.Total, 10)
	}
	return fmt.Sprintf("bytes %d-%d/%s", c.First, c.Last, total)
}

func parseContentRange(s string) (ContentRange, bool) {
	var c ContentRange
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return c, false
	}
	rng, total, ok := strings.Cut(rest, "/")
	if !ok {
		return c, false
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return c, false
	}
	var err1, err2, err3 error
	c.First, err1 = strconv.ParseInt(a, 10, 64)
	c.Last, err2 = strconv.ParseInt(b, 10, 64)
	if total == "*" {
		c.Total = -1
	} else {
		c.Total, err3 = strconv.ParseInt(total, 10, 64)
	}
	if err1 != nil || err2 != nil || err3 != nil || c.First < 0 || c.Last < c.First || (c.Total >= 0 && c.Last >= c.Total) {
		return c, false
	}
	return c, true
}

// Blob is a fetched blob.
type Blob struct {
	Digest v1.Hash
	// Size is the whole blob's size, -1 if unknown.
	Size int64
	// Partial is set for a 206 answer to a range request.
	Partial *ContentRange
	// Length is the number of bytes in Body, -1 if unknown.
	Length int64
	// Body is nil for HEAD.
	Body io.ReadCloser
}

// TagQuery is a page request of the tags list (n and last).
type TagQuery struct {
	N    int // 0: the upstream's default
	Last string
}

// TagList is one page of tags.
type TagList struct {
	Tags []string
	// Next is the query of the next page, nil on the last page.
	Next *TagQuery
}

// Referrers is an OCI image index of referrers.
type Referrers struct {
	MediaType string
	Body      []byte
	// FiltersApplied is the OCI-Filters-Applied header ("artifactType" when
	// the list was filtered).
	FiltersApplied string
}

// Manifest media types this proxy asks for when the client names none.
var defaultManifestAccept = []string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.v1+prettyjws",
	"application/vnd.docker.distribution.manifest.v1+json",
	"application/vnd.oci.artifact.manifest.v1+json",
}

const (
	ociIndexType = "application/vnd.oci.image.index.v1+json"
	maxListSize  = 16 << 20 // tags lists and referrers indexes
)

// direct fetches from the upstream on every call.
type direct struct {
	up          *upstreams
	maxManifest int64
}

// newRequest builds a request to the upstream API under the session.
func newRequest(ctx context.Context, method string, s *session, path string, q url.Values) (*http.Request, error) {
	return http.NewRequestWithContext(ctx, method, s.url(path, q), nil)
}

func (f *direct) Manifest(ctx context.Context, t Target, ref string, req ManifestRequest) (*Manifest, error) {
	ctx, cancel := context.WithTimeout(ctx, f.up.reqTimeout)
	defer cancel()
	s, err := f.up.session(ctx, t, pullScope(t.Repo))
	if err != nil {
		return nil, err
	}
	return f.manifest(ctx, s, t, ref, req)
}

func (f *direct) manifest(ctx context.Context, s *session, t Target, ref string, req ManifestRequest) (*Manifest, error) {
	var want v1.Hash
	byDigest := strings.Contains(ref, ":")
	if byDigest {
		var err error
		if want, err = v1.NewHash(ref); err != nil {
			return nil, newError(http.StatusBadRequest, CodeDigestInvalid, "invalid digest")
		}
	}
	method := http.MethodGet
	if req.Head {
		method = http.MethodHead
	}
	hreq, err := newRequest(ctx, method, s, "/v2/"+t.Repo+"/manifests/"+ref, nil)
	if err != nil {
		return nil, err
	}
	accept := req.Accept
	if len(accept) == 0 {
		accept = defaultManifestAccept
	}
	hreq.Header.Set("Accept", strings.Join(accept, ", "))
	resp, err := f.up.do(s, hreq, "manifest")
	if err != nil {
		return nil, mapTransportError(t, err, s.withCred)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			f.up.drop(s)
		}
		return nil, mapUpstreamStatus(t, opManifest, resp, s.withCred)
	}
	if resp.ContentLength > f.maxManifest {
		return nil, tooLarge(t, f.maxManifest)
	}
	mt := resp.Header.Get("Content-Type")
	hdrDigest := resp.Header.Get("Docker-Content-Digest")
	if req.Head {
		// A HEAD by tag without a digest header, or without a length,
		// cannot be answered truthfully: fall back to a GET and hash.
		if (hdrDigest == "" && !byDigest) || resp.ContentLength < 0 {
			return f.manifest(ctx, s, t, ref, ManifestRequest{Accept: req.Accept})
		}
		d := want
		if hdrDigest != "" {
			hd, err := v1.NewHash(hdrDigest)
			if err != nil || (byDigest && hd != want) {
				return nil, digestMismatch(t)
			}
			d = hd
		}
		return &Manifest{MediaType: mt, Digest: d, Size: resp.ContentLength}, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, f.maxManifest+1))
	if err != nil {
		return nil, mapTransportError(t, err, s.withCred)
	}
	if int64(len(body)) > f.maxManifest {
		return nil, tooLarge(t, f.maxManifest)
	}
	algo := "sha256"
	if byDigest {
		algo = want.Algorithm
	} else if hdrDigest != "" {
		if hd, err := v1.NewHash(hdrDigest); err == nil {
			algo = hd.Algorithm
		}
	}
	got, err := hashBytes(algo, body)
	if err != nil {
		return nil, digestMismatch(t)
	}
	if byDigest && got != want {
		return nil, digestMismatch(t)
	}
	if hdrDigest != "" && hdrDigest != got.String() {
		return nil, digestMismatch(t)
	}
	if mt == "" || mt == "application/json" || mt == "text/plain" {
		var probe struct {
			MediaType string `json:"mediaType"`
		}
		if json.Unmarshal(body, &probe) == nil && probe.MediaType != "" {
			mt = probe.MediaType
		}
	}
	return &Manifest{MediaType: mt, Digest: got, Size: int64(len(body)), Body: body}, nil
}

func tooLarge(t Target, limit int64) *Error {
	return newError(http.StatusBadGateway, CodeManifestInvalid, "manifest from %s is too large (limit %d bytes)", t.Upstream, limit)
}

func digestMismatch(t Target) *Error {
	return newError(http.StatusBadGateway, CodeManifestInvalid, "upstream %s sent a manifest whose digest does not match; nothing was served", t.Upstream)
}

func hashBytes(algo string, b []byte) (v1.Hash, error) {
	h, err := v1.Hasher(algo)
	if err != nil {
		return v1.Hash{}, err
	}
	h.Write(b)
	return v1.Hash{Algorithm: algo, Hex: fmt.Sprintf("%x", h.Sum(nil))}, nil
}

func (f *direct) Blob(ctx context.Context, t Target, d v1.Hash, req BlobRequest) (*Blob, error) {
	s, err := f.up.session(ctx, t, pullScope(t.Repo))
	if err != nil {
		return nil, err
	}
	method := http.MethodGet
	if req.Head {
		method = http.MethodHead
	}
	hreq, err := newRequest(ctx, method, s, "/v2/"+t.Repo+"/blobs/"+d.String(), nil)
	if err != nil {
		return nil, err
	}
	if req.Range != nil {
		hreq.Header.Set("Range", req.Range.String())
	}
	resp, err := f.up.do(s, hreq, "blob")
	if err != nil {
		return nil, mapTransportError(t, err, s.withCred)
	}
	switch resp.StatusCode {
	case http.StatusOK, http.StatusPartialContent:
	default:
		defer resp.Body.Close()
		if resp.Request != nil && !sameHost(resp.Request.URL, s.host) {
			// A redirect target (object storage) failed: not the upstream's
			// verdict on the project's credential.
			return nil, newError(http.StatusBadGateway, CodeUnavailable, "the storage upstream %s redirected to (%s) answered %d", t.Upstream, hostOnly(resp.Request.URL.Host), resp.StatusCode)
		}
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			f.up.drop(s)
		}
		return nil, mapUpstreamStatus(t, opBlob, resp, s.withCred)
	}
	if hd := resp.Header.Get("Docker-Content-Digest"); hd != "" && hd != d.String() && resp.StatusCode == http.StatusOK {
		resp.Body.Close()
		return nil, newError(http.StatusBadGateway, CodeBlobUnknown, "upstream %s answered with another blob than the one asked for; nothing was served", t.Upstream)
	}
	b := &Blob{Digest: d, Size: -1, Length: resp.ContentLength}
	if resp.StatusCode == http.StatusPartialContent {
		cr, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok {
			resp.Body.Close()
			return nil, newError(http.StatusBadGateway, CodeUnavailable, "upstream %s sent a partial answer without a valid Content-Range", t.Upstream)
		}
		b.Partial, b.Size = &cr, cr.Total
		if n := cr.Last - cr.First + 1; b.Length < 0 {
			b.Length = n
		} else if b.Length != n {
			resp.Body.Close()
			return nil, newError(http.StatusBadGateway, CodeUnavailable, "upstream %s sent a partial answer whose length does not match its Content-Range", t.Upstream)
		}
	} else {
		b.Size = resp.ContentLength
	}
	if req.Head {
		resp.Body.Close()
		return b, nil
	}
	if b.Partial != nil || req.Raw {
		b.Body = resp.Body
		return b, nil
	}
	vr, err := newVerifier(resp.Body, d, resp.ContentLength)
	if err != nil {
		resp.Body.Close()
		return nil, newError(http.StatusBadRequest, CodeDigestInvalid, "unsupported digest algorithm %s", d.Algorithm)
	}
	b.Body = vr
	return b, nil
}

func (f *direct) Tags(ctx context.Context, t Target, q TagQuery) (*TagList, error) {
	ctx, cancel := context.WithTimeout(ctx, f.up.reqTimeout)
	defer cancel()
	s, err := f.up.session(ctx, t, pullScope(t.Repo))
	if err != nil {
		return nil, err
	}
	vals := url.Values{}
	if q.N > 0 {
		vals.Set("n", strconv.Itoa(q.N))
	}
	if q.Last != "" {
		vals.Set("last", q.Last)
	}
	hreq, err := newRequest(ctx, http.MethodGet, s, "/v2/"+t.Repo+"/tags/list", vals)
	if err != nil {
		return nil, err
	}
	resp, err := f.up.do(s, hreq, "tags")
	if err != nil {
		return nil, mapTransportError(t, err, s.withCred)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, mapUpstreamStatus(t, opTags, resp, s.withCred)
	}
	var body struct {
		Tags []string `json:"tags"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxListSize)).Decode(&body); err != nil {
		return nil, newError(http.StatusBadGateway, CodeUnavailable, "upstream %s sent an unreadable tag list", t.Upstream).withCause(err)
	}
	out := &TagList{Tags: body.Tags}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if next := nextLink(resp.Header.Get("Link")); next != nil {
		nq := &TagQuery{Last: next.Get("last")}
		if n, err := strconv.Atoi(next.Get("n")); err == nil && n > 0 {
			nq.N = n
		}
		if nq.Last != "" {
			out.Next = nq
		}
	}
	return out, nil
}

// nextLink extracts the query of a Link header's rel="next" URL.
func nextLink(h string) url.Values {
	for _, part := range strings.Split(h, ",") {
		part = strings.TrimSpace(part)
		if !strings.Contains(part, `rel="next"`) && !strings.Contains(part, "rel=next") {
			continue
		}
		start, end := strings.IndexByte(part, '<'), strings.IndexByte(part, '>')
		if start < 0 || end <= start {
			continue
		}
		u, err := url.Parse(part[start+1 : end])
		if err != nil {
			continue
		}
		return u.Query()
	}
	return nil
}

func (f *direct) Referrers(ctx context.Context, t Target, d v1.Hash, artifactType string) (*Referrers, error) {
	ctx, cancel := context.WithTimeout(ctx, f.up.reqTimeout)
	defer cancel()
	s, err := f.up.session(ctx, t, pullScope(t.Repo))
	if err != nil {
		return nil, err
	}
	vals := url.Values{}
	if artifactType != "" {
		vals.Set("artifactType", artifactType)
	}
	hreq, err := newRequest(ctx, http.MethodGet, s, "/v2/"+t.Repo+"/referrers/"+d.String(), vals)
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Accept", ociIndexType)
	resp, err := f.up.do(s, hreq, "referrers")
	if err != nil {
		return nil, mapTransportError(t, err, s.withCred)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxListSize+1))
		if err != nil {
			return nil, mapTransportError(t, err, s.withCred)
		}
		if len(body) > maxListSize {
			return nil, newError(http.StatusBadGateway, CodeUnavailable, "referrers list from %s is too large", t.Upstream)
		}
		if !json.Valid(body) {
			return nil, newError(http.StatusBadGateway, CodeUnavailable, "upstream %s sent an unreadable referrers list", t.Upstream)
		}
		return &Referrers{MediaType: ociIndexType, Body: body, FiltersApplied: resp.Header.Get("OCI-Filters-Applied")}, nil
	case http.StatusNotFound:
		// The upstream has no referrers API: fall back to the tag schema
		// (<alg>-<hex>), then to an empty index, as the OCI spec lets a
		// registry answer for a subject without referrers.
		return f.referrersByTag(ctx, s, t, d, artifactType)
	default:
		return nil, mapUpstreamStatus(t, opReferrers, resp, s.withCred)
	}
}

func (f *direct) referrersByTag(ctx context.Context, s *session, t Target, d v1.Hash, artifactType string) (*Referrers, error) {
	m, err := f.manifest(ctx, s, t, d.Algorithm+"-"+d.Hex, ManifestRequest{Accept: []string{ociIndexType}})
	var e *Error
	if errors.As(err, &e) && e.Status == http.StatusNotFound {
		return &Referrers{MediaType: ociIndexType, Body: emptyIndex()}, nil
	}
	if err != nil {
		return nil, err
	}
	var idx v1.IndexManifest
	if json.Unmarshal(m.Body, &idx) != nil {
		return &Referrers{MediaType: ociIndexType, Body: emptyIndex()}, nil
	}
	out := Referrers{MediaType: ociIndexType}
	if artifactType != "" {
		kept := idx.Manifests[:0]
		for _, desc := range idx.Manifests {
			if desc.ArtifactType == artifactType {
				kept = append(kept, desc)
			}
		}
		idx.Manifests = kept
		out.FiltersApplied = "artifactType"
	}
	if idx.Manifests == nil {
		idx.Manifests = []v1.Descriptor{}
	}
	idx.SchemaVersion, idx.MediaType = 2, ociIndexType
	b, err := json.Marshal(idx)
	if err != nil {
		return nil, err
	}
	out.Body = b
	return &out, nil
}

func emptyIndex() []byte {
	return []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
}
