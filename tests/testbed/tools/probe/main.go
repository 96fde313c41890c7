// Command probe is the test bed's smallest in-cluster program (testbed.podnet), run in pods
// of the bed's kubelet nodes from a one-layer image of just this static file:
//
//	probe whoami        as any in-cluster client: the apiserver at the `kubernetes` Service
//	                    ($KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, the ClusterIP),
//	                    TLS verified with the ServiceAccount's ca.crt, authenticated with its
//	                    token; POSTs a SelfSubjectReview and prints the reply (JSON), exit 0.
//	probe listen PORT   listens on 0.0.0.0:PORT and answers every HTTP request with the
//	                    host name (a hostNetwork pod: its node's), until SIGTERM.
//	probe get URL       GETs URL (plain HTTP) and prints the body; exit 1 unless 200.
//	probe lookup NAME   resolves NAME through the pod's resolv.conf (the cluster DNS) and
//	                    prints its addresses, sorted, one a line; exit 1 if none.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"
)

const account = "/var/run/secrets/kubernetes.io/serviceaccount/"

func whoami() error {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return fmt.Errorf("KUBERNETES_SERVICE_HOST/PORT not set: not in a pod?")
	}
	caPEM, err := os.ReadFile(account + "ca.crt")
	if err != nil {
		return err
	}
	token, err := os.ReadFile(account + "token")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %sca.crt", account)
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "kubernetes.default.svc"}}}
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	url := "https://" + net.JoinHostPort(host, port) +
		"/apis/authentication.k8s.io/v1/selfsubjectreviews"
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	reply, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("%s: %s: %s", url, resp.Status, reply)
	}
	fmt.Println(string(reply))
	return nil
}

func listen(port string) error {
	name, err := os.Hostname()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("0.0.0.0", port))
	if err != nil {
		return err
	}
	fmt.Println("listening on", ln.Addr())
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-stop; os.Exit(0) }()
	return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, name)
	}))
}

func get(url string) error {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	fmt.Print(string(body))
	return nil
}

func lookup(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupHost(ctx, name)
	if err != nil {
		return err
	}
	sort.Strings(addrs)
	for _, a := range addrs {
		fmt.Println(a)
	}
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) == 2 && os.Args[1] == "whoami":
		err = whoami()
	case len(os.Args) == 3 && os.Args[1] == "listen":
		err = listen(os.Args[2])
	case len(os.Args) == 3 && os.Args[1] == "get":
		err = get(os.Args[2])
	case len(os.Args) == 3 && os.Args[1] == "lookup":
		err = lookup(os.Args[2])
	default:
		err = fmt.Errorf("usage: probe whoami | probe listen PORT | probe get URL | probe lookup NAME")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}
