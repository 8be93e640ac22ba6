package registry

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// uploadChunk is the PATCH size of pushLayer's chunked uploads; see there.
const uploadChunk = 256 << 10

// pushLayer uploads a layer's blob to repo.
//
// With the inmemory storage driver it uploads in uploadChunk-sized PATCHes
// rather than in one: distribution's inmemory writer grows its buffer by
// exactly each Write (32 KiB at a time from io.Copy) and copies everything
// so far on every growth, so one 64 MiB PATCH copies about 64 GiB and takes
// minutes. A new writer per small PATCH keeps that quadratic term small; the
// file itself grows geometrically. The filesystem driver streams, so one
// PATCH (go-containerregistry's WriteLayer) is best there.
func (r *Registry) pushLayer(ctx context.Context, repo name.Repository, l v1.Layer) error {
	if r.fsRoot != "" {
		return remote.WriteLayer(repo, l, r.seedOptions(ctx)...)
	}
	d, err := l.Digest()
	if err != nil {
		return err
	}
	size, err := l.Size()
	if err != nil {
		return err
	}
	rt, err := transport.NewWithContext(ctx, repo.Registry, r.seedAuth(), r.seed,
		[]string{repo.Scope(transport.PushScope)})
	if err != nil {
		return fmt.Errorf("authenticate: %w", err)
	}
	c := &http.Client{Transport: rt}
	base := r.URL() + "/v2/" + repo.RepositoryStr() + "/blobs/"

	if resp, err := send(ctx, c, http.MethodHead, base+d.String(), nil, 0, nil); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil // already there
		}
	}
	resp, err := send(ctx, c, http.MethodPost, base+"uploads/", nil, 0, nil)
	if err != nil {
		return err
	}
	loc, err := nextLocation(resp, http.StatusAccepted)
	if err != nil {
		return fmt.Errorf("start upload: %w", err)
	}

	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, uploadChunk)
	for off := int64(0); off < size; {
		n, err := io.ReadFull(rc, buf[:min(int64(len(buf)), size-off)])
		if err != nil {
			return fmt.Errorf("read layer at %d: %w", off, err)
		}
		hdr := http.Header{
			"Content-Type":  {"application/octet-stream"},
			"Content-Range": {fmt.Sprintf("%d-%d", off, off+int64(n)-1)},
		}
		resp, err := send(ctx, c, http.MethodPatch, loc, hdr, int64(n), bytes.NewReader(buf[:n]))
		if err != nil {
			return err
		}
		if loc, err = nextLocation(resp, http.StatusAccepted); err != nil {
			return fmt.Errorf("upload at %d: %w", off, err)
		}
		off += int64(n)
	}

	u, err := url.Parse(loc)
	if err != nil {
		return err
	}
	q := u.Query()
	q.Set("digest", d.String())
	u.RawQuery = q.Encode()
	resp, err = send(ctx, c, http.MethodPut, u.String(), nil, 0, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return transport.CheckError(resp, http.StatusCreated)
}

func send(ctx context.Context, c *http.Client, method, u string, hdr http.Header, n int64, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.ContentLength = n
	return c.Do(req)
}

// nextLocation checks resp's status and resolves its Location header.
func nextLocation(resp *http.Response, want int) (string, error) {
	defer resp.Body.Close()
	if err := transport.CheckError(resp, want); err != nil {
		return "", err
	}
	loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
	if err != nil {
		return "", fmt.Errorf("bad Location %q: %w", resp.Header.Get("Location"), err)
	}
	return loc.String(), nil
}
