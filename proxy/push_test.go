package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// TestPushPassThrough pushes through the proxy (ggcr remote.Write, then
// monolithic, chunked and mount uploads by hand) and checks the result on
// the upstream directly.
func TestPushPassThrough(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, true)
	f := newPX(t, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	push := f.token("acme", ScopePull, ScopePush)
	pull := f.token("acme", ScopePull)

	t.Run("remote.Write", func(t *testing.T) {
		img, err := random.Image(300<<10, 3)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(f.ref("up/ci/app:v1"), img, f.client(push)...); err != nil {
			t.Fatalf("push through the proxy: %v", err)
		}
		ref, _ := name.ParseReference(up.Ref("ci/app", "v1"))
		got, err := remote.Image(ref, pxDirect(f.ctx)...)
		if err != nil {
			t.Fatal(err)
		}
		gd, _ := got.Digest()
		wd, _ := img.Digest()
		if gd != wd {
			t.Fatalf("upstream has %s, pushed %s", gd, wd)
		}
		if err := remote.Write(f.ref("up/ci/app:v2"), img, f.client(pull)...); err == nil {
			t.Fatal("a pull-only token pushed")
		}
	})

	blob := bytes.Repeat([]byte("0123456789abcdef"), 20000) // 320000 bytes
	d := digestOf(blob)
	upstreamHas := func(repo, d string) bool {
		dg, err := name.NewDigest(up.Addr() + "/" + repo + "@" + d)
		if err != nil {
			t.Fatal(err)
		}
		l, err := remote.Layer(dg, pxDirect(f.ctx)...)
		if err != nil {
			return false
		}
		rc, err := l.Compressed()
		if err != nil {
			return false
		}
		defer rc.Close()
		_, err = io.Copy(io.Discard, rc) // verifies the digest
		return err == nil
	}

	t.Run("monolithic", func(t *testing.T) {
		resp := f.do(http.MethodPost, "/v2/up/ci/mono/blobs/uploads/?digest="+d, push, bytes.NewReader(blob), "Content-Type", "application/octet-stream")
		body := f.readAll(resp)
		if resp.StatusCode == http.StatusAccepted {
			// distribution ignores ?digest= on POST (the spec lets it): the
			// client then PUTs the whole blob to the upload.
			loc := resp.Header.Get("Location")
			if !strings.HasPrefix(loc, "/v2/up/ci/mono/blobs/uploads/") {
				t.Fatalf("Location %q", loc)
			}
			resp = f.do(http.MethodPut, loc+"?digest="+d, push, bytes.NewReader(blob), "Content-Type", "application/octet-stream")
			body = f.readAll(resp)
		}
		if resp.StatusCode != http.StatusCreated || resp.Header.Get("Location") != "/v2/up/ci/mono/blobs/"+d {
			t.Fatalf("%d %q %s", resp.StatusCode, resp.Header.Get("Location"), body)
		}
		if !upstreamHas("ci/mono", d) {
			t.Fatal("the upstream lacks the blob")
		}
	})

	t.Run("chunked", func(t *testing.T) {
		resp := f.do(http.MethodPost, "/v2/up/ci/chunked/blobs/uploads/", push, nil)
		f.readAll(resp)
		loc := resp.Header.Get("Location")
		if resp.StatusCode != http.StatusAccepted || !strings.HasPrefix(loc, "/v2/up/ci/chunked/blobs/uploads/") {
			t.Fatalf("start: %d %q", resp.StatusCode, loc)
		}
		if strings.Contains(loc, up.Host()) || strings.Contains(loc, "_state") {
			t.Fatalf("the upstream upload URL leaked to the client: %s", loc)
		}
		half := len(blob) / 2
		for i, part := range [][]byte{blob[:half], blob[half:]} {
			start := i * half
			resp = f.do(http.MethodPatch, loc, push, bytes.NewReader(part),
				"Content-Type", "application/octet-stream",
				"Content-Range", fmt.Sprintf("%d-%d", start, start+len(part)-1))
			body := f.readAll(resp)
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("PATCH %d: %d %s", i, resp.StatusCode, body)
			}
			loc = resp.Header.Get("Location")
			if want := fmt.Sprintf("0-%d", start+len(part)-1); resp.Header.Get("Range") != want {
				t.Fatalf("Range %q, want %q", resp.Header.Get("Range"), want)
			}
		}
		resp = f.get(loc, push)
		f.readAll(resp)
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("status: %d", resp.StatusCode)
		}
		// Another project's token cannot continue this upload.
		other := f.token("beta", ScopePull, ScopePush)
		resp = f.do(http.MethodPut, loc+"&digest="+d, other, nil)
		f.readAll(resp)
		if resp.StatusCode == http.StatusCreated {
			t.Fatal("project beta finished project acme's upload")
		}
		sep := "?"
		if strings.Contains(loc, "?") {
			sep = "&"
		}
		resp = f.do(http.MethodPut, loc+sep+"digest="+d, push, nil)
		body := f.readAll(resp)
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("PUT: %d %s", resp.StatusCode, body)
		}
		if !upstreamHas("ci/chunked", d) {
			t.Fatal("the upstream lacks the blob")
		}
		// A forged upload id is unknown.
		resp = f.do(http.MethodPatch, "/v2/up/ci/chunked/blobs/uploads/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", push, strings.NewReader("x"))
		body = f.readAll(resp)
		if code, _ := errorCode(body); code != CodeBlobUploadUnknown {
			t.Fatalf("forged id: %d %s", resp.StatusCode, body)
		}
	})

	t.Run("mount", func(t *testing.T) {
		resp := f.do(http.MethodPost, "/v2/up/ci/mounted/blobs/uploads/?mount="+d+"&from=up/ci/mono", push, nil)
		body := f.readAll(resp)
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("mount: %d %s", resp.StatusCode, body)
		}
		if !upstreamHas("ci/mounted", d) {
			t.Fatal("the upstream lacks the mounted blob")
		}
		// A from= on another upstream is ignored: a plain upload starts.
		resp = f.do(http.MethodPost, "/v2/up/ci/m2/blobs/uploads/?mount="+d+"&from=ghcr.io/x/y", push, nil)
		f.readAll(resp)
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("foreign mount: %d", resp.StatusCode)
		}
	})

	t.Run("pull-only token", func(t *testing.T) {
		resp := f.do(http.MethodPost, "/v2/up/ci/mono/blobs/uploads/?digest="+d, pull, bytes.NewReader(blob))
		body := f.readAll(resp)
		if code, _ := errorCode(body); resp.StatusCode != http.StatusForbidden || code != CodeDenied {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
		// An upload's status is part of pushing too.
		resp = f.get("/v2/up/ci/mono/blobs/uploads/AAAA", pull)
		body = f.readAll(resp)
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("upload status with a pull token: %d %s", resp.StatusCode, body)
		}
	})

	t.Run("manifest too large", func(t *testing.T) {
		resp := f.do(http.MethodPut, "/v2/up/ci/app/manifests/big", push, io.LimitReader(zeros{}, 5<<20),
			"Content-Type", "application/vnd.oci.image.manifest.v1+json")
		body := f.readAll(resp)
		if code, msg := errorCode(body); code != CodeManifestInvalid || !strings.Contains(msg, "too large") {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	})
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
