package cache

import "context"

// RequestOption qualifies one Blob, Manifest or ResolveTag call.
type RequestOption func(*request)

// CheckFunc proves, upstream and with the requesting project's own
// credential, that content is in a repository: typically a HEAD of
// /v2/<repo>/blobs/<digest> (or manifests/<digest>) that must answer 200.
// It returns nil when it is, an error (passed back to the caller) when not.
type CheckFunc func(ctx context.Context) error

type repoRef struct{ upstream, repo string }

type request struct {
	size   int64
	labels Labels
	in     *repoRef
	check  CheckFunc
}

func newRequest(opts []RequestOption) *request {
	r := &request{size: -1}
	for _, o := range opts {
		o(r)
	}
	return r
}

// ExpectSize states the size the content must have (from a descriptor or a
// HEAD): a fetch announcing or sending another size fails.
func ExpectSize(n int64) RequestOption {
	return func(r *request) {
		if n >= 0 {
			r.size = n
		}
	}
}

// Project labels the request's metrics with the project it serves.
func Project(project string) RequestOption {
	return func(r *request) { r.labels.Project = project }
}

// In scopes the request to the upstream repository it came through — the
// content-location half of tenant isolation (the other half, the project's
// access record for that repository, is the caller's; see the package
// documentation):
//
//   - a cached entry, or a fill in flight from another repository, is
//     served only if the digest is known to be in upstream/repo (recorded
//     when content was fetched through that repository, when a manifest
//     fetched through it references the digest, or by SetTag/AddToRepo);
//   - otherwise check runs (an upstream HEAD with the project's own
//     credential) and must return nil; the location is then recorded. With
//     a nil check the request fails with ErrNotInRepository;
//   - a miss fetches through that repository (fetch is the caller's, made
//     with the project's credential), and the location is recorded when
//     the fill commits.
//
// Without In, content is served by digest alone: only for callers that
// have no tenant (the CLI, warm-up).
func In(upstream, repo string, check CheckFunc) RequestOption {
	return func(r *request) {
		r.in = &repoRef{upstream: normHost(upstream), repo: repo}
		r.check = check
		r.labels.Upstream = normHost(upstream)
	}
}
