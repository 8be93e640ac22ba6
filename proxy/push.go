package proxy

// Push pass-through for principals with the push scope: blob uploads
// (monolithic with ?digest=, chunked PATCH then PUT), cross-repository
// mount and manifest PUT, forwarded to the upstream with the project's
// credential under a push-scoped upstream token. Request bodies stream
// through; only manifests (bounded) are read whole.
//
// The upstream's upload URL never reaches the client: it is sealed
// (AES-256-GCM, key per server process, bound to the project, the
// repository name and the upstream) into the upload id of the Location
// the client gets, /v2/<name>/blobs/uploads/<id>. Nothing is kept in
// memory per upload, so abandoned uploads cost nothing. The sealing key is
// the process's own unless WithUploadKey shares one between replicas.

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

const uploadTTL = 24 * time.Hour

// uploadState is what an upload id carries, sealed.
type uploadState struct {
	URL      string `json:"u"` // the upstream's upload URL, absolute
	Project  string `json:"p"`
	Name     string `json:"n"` // the client's repository name
	Upstream string `json:"h"`
	Expires  int64  `json:"e"` // unix seconds
}

type uploadSealer struct{ aead cipher.AEAD }

func newUploadSealer(key []byte) *uploadSealer {
	if len(key) != 32 {
		key = make([]byte, 32)
		rand.Read(key)
	}
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	return &uploadSealer{aead: aead}
}

var uploadAAD = []byte("pullsecret/upload/v1")

func (u *uploadSealer) seal(st uploadState) string {
	pt, _ := json.Marshal(st)
	nonce := make([]byte, u.aead.NonceSize())
	rand.Read(nonce)
	return base64.RawURLEncoding.EncodeToString(u.aead.Seal(nonce, nonce, pt, uploadAAD))
}

func (u *uploadSealer) open(id string, now time.Time) (uploadState, bool) {
	var st uploadState
	b, err := base64.RawURLEncoding.DecodeString(id)
	if err != nil || len(b) < u.aead.NonceSize()+u.aead.Overhead() {
		return st, false
	}
	ns := u.aead.NonceSize()
	pt, err := u.aead.Open(nil, b[:ns], b[ns:], uploadAAD)
	if err != nil || json.Unmarshal(pt, &st) != nil || now.Unix() > st.Expires {
		return st, false
	}
	return st, true
}

func uploadUnknown() *Error {
	return newError(http.StatusNotFound, CodeBlobUploadUnknown, "upload unknown or expired")
}

// clientURL is a proxy URL for the client: path under /v2/<name>, with
// ns= kept in mirror mode.
func clientURL(rt *route, suffix string, q url.Values) string {
	if rt.ns {
		if q == nil {
			q = url.Values{}
		}
		q.Set("ns", rt.key)
	}
	u := "/v2/" + rt.path + suffix
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

var uploadRangeRE = regexp.MustCompile(`^(bytes=)?\d{1,19}-\d{1,19}$`)

// copyUploadHeaders passes the upload progress headers that carry no
// upstream URL.
func copyUploadHeaders(dst, src http.Header) {
	if r := src.Get("Range"); uploadRangeRE.MatchString(r) {
		dst.Set("Range", r)
	}
	if v := src.Get("OCI-Chunk-Min-Length"); v != "" {
		if _, err := strconv.ParseInt(v, 10, 64); err == nil {
			dst.Set("OCI-Chunk-Min-Length", v)
		}
	}
}

// send issues an upload request: through the session when the URL is on
// the upstream's domain, else without credentials.
func (u *upstreams) send(s *session, req *http.Request, op string) (*http.Response, error) {
	if sameDomain(hostOnly(s.host), hostOnly(req.URL.Host)) {
		return u.do(s, req, op)
	}
	return u.plain.RoundTrip(req)
}

func bodyOf(r *http.Request) (io.Reader, int64) {
	if r.Body == nil || r.ContentLength == 0 {
		return http.NoBody, 0
	}
	return r.Body, r.ContentLength
}

func newUpstreamRequest(ctx context.Context, method, u string, r *http.Request) (*http.Request, error) {
	body, n := bodyOf(r)
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	req.ContentLength = n
	for _, k := range []string{"Content-Type", "Content-Range"} {
		if v := r.Header.Get(k); v != "" && len(v) < 256 {
			req.Header.Set(k, v)
		}
	}
	if n == 0 {
		req.Header.Del("Content-Type")
	}
	return req, nil
}

// startUpload serves POST /v2/<name>/blobs/uploads/.
func (s *Server) startUpload(w http.ResponseWriter, r *http.Request, p *Principal, rt *route, t Target) {
	q := r.URL.Query()
	upQ := url.Values{}
	scopes := []string{pushScope(t.Repo)}
	if d := q.Get("digest"); d != "" {
		if _, err := v1.NewHash(d); err != nil {
			WriteError(w, r, newError(http.StatusBadRequest, CodeDigestInvalid, "invalid digest"))
			return
		}
		upQ.Set("digest", d)
	}
	if mount, from := q.Get("mount"), q.Get("from"); mount != "" && from != "" {
		if _, err := v1.NewHash(mount); err != nil {
			WriteError(w, r, newError(http.StatusBadRequest, CodeDigestInvalid, "invalid mount digest"))
			return
		}
		if fromRepo, ok := s.mountSource(r.Context(), p, rt, t, from); ok {
			upQ.Set("mount", mount)
			upQ.Set("from", fromRepo)
			scopes = append(scopes, pullScope(fromRepo))
		}
		// Otherwise the mount is ignored and a plain upload starts, as the
		// distribution spec lets a registry do.
	}
	sess, err := s.up.session(r.Context(), t, scopes...)
	if err != nil {
		WriteError(w, r, mapTransportError(t, err, true))
		return
	}
	req, err := newUpstreamRequest(r.Context(), http.MethodPost, sess.url("/v2/"+t.Repo+"/blobs/uploads/", upQ), r)
	if err != nil {
		WriteError(w, r, err)
		return
	}
	s.forwardUpload(w, r, rt, t, sess, req, "")
}

// mountSource maps a mount's from= (a repository name as the client
// writes it) to a repository on the same upstream that the principal may
// pull.
func (s *Server) mountSource(ctx context.Context, p *Principal, rt *route, t Target, from string) (string, bool) {
	var key, rest string
	if rt.ns {
		key, rest = rt.key, from
	} else {
		var ok bool
		if key, rest, ok = strings.Cut(from, "/"); !ok {
			return "", false
		}
	}
	if validUpstreamKey(key) != nil || validRepoPath(rest) != nil {
		return "", false
	}
	if !s.auth.Allows(p, key+"/"+rest, "pull") {
		return "", false
	}
	a, err := s.allowlist(ctx, p.Project)
	if err != nil {
		return "", false
	}
	host, ok := a.Upstream(key)
	if !ok || host != t.Upstream {
		return "", false
	}
	return upstreamRepo(host, rest), true
}

// continueUpload serves GET, PATCH, PUT and DELETE of an upload.
func (s *Server) continueUpload(w http.ResponseWriter, r *http.Request, p *Principal, rt *route, t Target) {
	st, ok := s.uploads.open(rt.ref, time.Now())
	if !ok || st.Project != p.Project || st.Name != rt.name || st.Upstream != t.Upstream {
		WriteError(w, r, uploadUnknown())
		return
	}
	up, err := url.Parse(st.URL)
	if err != nil {
		WriteError(w, r, uploadUnknown())
		return
	}
	sess, err := s.up.session(r.Context(), t, pushScope(t.Repo))
	if err != nil {
		WriteError(w, r, mapTransportError(t, err, true))
		return
	}
	var digest string
	if r.Method == http.MethodPut {
		digest = r.URL.Query().Get("digest")
		if _, err := v1.NewHash(digest); err != nil {
			WriteError(w, r, newError(http.StatusBadRequest, CodeDigestInvalid, "PUT of an upload needs ?digest=<valid digest>"))
			return
		}
		if info := infoFrom(r.Context()); info != nil {
			info.digest = digest
		}
		uq := up.Query()
		uq.Set("digest", digest)
		up.RawQuery = uq.Encode()
	}
	req, err := newUpstreamRequest(r.Context(), r.Method, up.String(), r)
	if err != nil {
		WriteError(w, r, err)
		return
	}
	s.forwardUpload(w, r, rt, t, sess, req, st.URL)
}

// forwardUpload sends an upload request upstream and answers the client,
// rewriting Location so the client keeps talking to the proxy.
func (s *Server) forwardUpload(w http.ResponseWriter, r *http.Request, rt *route, t Target, sess *session, req *http.Request, current string) {
	resp, err := s.up.send(sess, req, "push")
	if err != nil {
		WriteError(w, r, mapTransportError(t, err, sess.withCred))
		return
	}
	defer drain(resp)
	h := w.Header()
	switch resp.StatusCode {
	case http.StatusCreated:
		d := resp.Header.Get("Docker-Content-Digest")
		if d == "" {
			d = req.URL.Query().Get("digest")
			if d == "" {
				d = req.URL.Query().Get("mount")
			}
		}
		if _, err := v1.NewHash(d); err == nil {
			h.Set("Docker-Content-Digest", d)
			h.Set("Location", clientURL(rt, "/blobs/"+d, nil))
		}
		h.Set("Content-Length", "0")
		w.WriteHeader(http.StatusCreated)
	case http.StatusAccepted, http.StatusNoContent:
		loc := resp.Header.Get("Location")
		next := current
		if loc != "" {
			u, err := req.URL.Parse(loc)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
				WriteError(w, r, newError(http.StatusBadGateway, CodeBlobUploadInvalid, "upstream %s sent an invalid upload location", t.Upstream))
				return
			}
			u.User = nil
			next = u.String()
		}
		if next == "" {
			WriteError(w, r, newError(http.StatusBadGateway, CodeBlobUploadInvalid, "upstream %s sent no upload location", t.Upstream))
			return
		}
		id := s.uploads.seal(uploadState{URL: next, Project: t.Project, Name: rt.name, Upstream: t.Upstream, Expires: time.Now().Add(uploadTTL).Unix()})
		h.Set("Location", clientURL(rt, "/blobs/uploads/"+id, nil))
		copyUploadHeaders(h, resp.Header)
		h.Set("Content-Length", "0")
		w.WriteHeader(resp.StatusCode)
	default:
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			s.up.drop(sess)
		}
		op := opPush
		if current != "" {
			op = opUpload
		}
		WriteError(w, r, mapUpstreamStatus(t, op, resp, sess.withCred))
	}
}

// putManifest serves PUT /v2/<name>/manifests/<ref>.
func (s *Server) putManifest(w http.ResponseWriter, r *http.Request, rt *route, t Target) {
	limit := int64(s.cfg.MaxManifestSize)
	if r.ContentLength > limit {
		WriteError(w, r, newError(http.StatusRequestEntityTooLarge, CodeManifestInvalid, "manifest too large (limit %d bytes)", limit))
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		WriteError(w, r, newError(http.StatusBadRequest, CodeManifestInvalid, "could not read the manifest").withCause(err))
		return
	}
	if int64(len(body)) > limit {
		WriteError(w, r, newError(http.StatusRequestEntityTooLarge, CodeManifestInvalid, "manifest too large (limit %d bytes)", limit))
		return
	}
	algo := "sha256"
	if rt.digest.Hex != "" {
		algo = rt.digest.Algorithm
	}
	got, err := hashBytes(algo, body)
	if err != nil {
		WriteError(w, r, newError(http.StatusBadRequest, CodeDigestInvalid, "unsupported digest algorithm"))
		return
	}
	if rt.digest.Hex != "" && got != rt.digest {
		WriteError(w, r, newError(http.StatusBadRequest, CodeDigestInvalid, "manifest does not match digest %s", rt.digest))
		return
	}
	if info := infoFrom(r.Context()); info != nil {
		info.digest = got.String()
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.up.reqTimeout)
	defer cancel()
	sess, err := s.up.session(ctx, t, pushScope(t.Repo))
	if err != nil {
		WriteError(w, r, mapTransportError(t, err, true))
		return
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, sess.url("/v2/"+t.Repo+"/manifests/"+rt.ref, nil), strings.NewReader(string(body)))
	if err != nil {
		WriteError(w, r, err)
		return
	}
	req.ContentLength = int64(len(body))
	if ct := r.Header.Get("Content-Type"); ct != "" && len(ct) < 256 {
		req.Header.Set("Content-Type", ct)
	}
	resp, err := s.up.do(sess, req, "push")
	if err != nil {
		WriteError(w, r, mapTransportError(t, err, sess.withCred))
		return
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusCreated {
		if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
			s.up.drop(sess)
		}
		WriteError(w, r, mapUpstreamStatus(t, opPush, resp, sess.withCred))
		return
	}
	if d := resp.Header.Get("Docker-Content-Digest"); d != "" && d != got.String() {
		s.log.Warn("upstream stored a manifest under another digest", "upstream", t.Upstream, "repo", t.Repo, "ours", got.String())
	}
	h := w.Header()
	h.Set("Docker-Content-Digest", got.String())
	h.Set("Location", clientURL(rt, "/manifests/"+got.String(), nil))
	if subj := resp.Header.Get("OCI-Subject"); subj != "" {
		if _, err := v1.NewHash(subj); err == nil {
			h.Set("OCI-Subject", subj)
		}
	}
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}
