package s3test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"
)

func TestServer(t *testing.T) {
	t.Parallel()
	srv := Start(t, WithKeys("AKIDS3TEST", "canary-s3test-secret"), WithBucket("bkt"))
	ctx := context.Background()
	drv, err := factory.Create(ctx, "s3aws", srv.Parameters())
	if err != nil {
		t.Fatal(err)
	}
	content := bytes.Repeat([]byte("s3test "), 1000)
	if err := drv.PutContent(ctx, "/a/b/obj", content); err != nil {
		t.Fatalf("put: %v\n%s", err, srv.Logs())
	}
	got, err := drv.GetContent(ctx, "/a/b/obj")
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("get: %d bytes, %v", len(got), err)
	}
	if files := srv.Files(t); !slices.Equal(files, []string{"a/b/obj"}) {
		t.Fatalf("Files = %q, want [a/b/obj]", files)
	}

	// Wrong keys are refused: the server checks signatures.
	p := srv.Parameters()
	p["secretkey"] = "not-the-secret"
	bad, err := factory.Create(ctx, "s3aws", p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.GetContent(ctx, "/a/b/obj"); err == nil || errors.As(err, new(storagedriver.PathNotFoundError)) {
		t.Fatalf("get with a wrong secret key: %v, want a signature error", err)
	}
}
